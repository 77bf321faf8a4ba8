"""Generated corpora for `crag_eval.py`: many short items, where each broad question needs
facts spread over many of them.

Three generators that share no attribute, template or filler sentence:

- `reviews` (the tuning corpus): product reviews. Each product has eight attributes (battery
  hours, weight, price, delivery days, colour, warranty, setup time, a defect); a review
  mentions one or two of them in one of several phrasings, plus filler. Attributes are
  mentioned with skewed frequencies, so some facts sit in a third of the reviews and some
  in a handful. Scope: metadata `product`.
- `chats` (held out at first, never seen by the tests; looked at since, to find why CRAG
  missed facts on it and to check the candidate rule that followed): a user's chat
  messages to an assistant. Each person has eight other attributes (city, job, pet,
  sister, sport, allergy, car, instrument), mentioned in passing among requests and small
  talk, with another frequency skew. Scope: `user_id`.
- `tickets` (held out: written before CRAG was ever run on it, never seen by the tests,
  run once with the final defaults): a support desk's tickets about customer accounts.
  Each account has eight attributes of yet another kind (plan, data region, sign-on
  provider, integration, a recurring error code, account manager, renewal month, seats),
  stated in third-person support notes that open with a ticket number and mix one to three
  facts with process notes; a fact may be stated in a single ticket. Scope: `session_id`.

Every fact has a key string that appears verbatim in every item stating it, so a context's
fact recall is the share of the question's keys it contains. Generation is seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    """A question about one subject: the facts a full answer needs (their keys), and for a
    short-answer question the one key that is the answer."""

    text: str
    facts: tuple[str, ...]
    answer: str | None = None


@dataclass
class Corpus:
    """Items to store (dicts for `Memory.add_many`, each with the scope to store it under),
    broad questions (fact recall) and short questions (answer accuracy), per subject."""

    name: str
    items: list[tuple[dict, dict]] = field(default_factory=list)  # (item, scope)
    broad: list[tuple[Question, dict]] = field(default_factory=list)  # (question, where)
    short: list[tuple[Question, dict]] = field(default_factory=list)


# -- reviews ------------------------------------------------------------------------------

PRODUCTS = [
    "Aurora X2 headphones",
    "Nimbus 7 e-reader",
    "Vela S smartwatch",
    "Tundra trail speaker",
    "Pico robot vacuum",
    "Helix travel kettle",
    "Orbit webcam",
    "Cobalt gaming mouse",
    "Lumen bike light",
    "Quill stylus pen",
]
COLOURS = ["sage green", "burnt orange", "slate blue", "matte black", "pearl white", "plum"]
DEFECTS = ["power button", "charging port", "left hinge", "rubber feet", "volume dial", "clip"]
REVIEW_ASPECTS: dict[str, tuple[float, list[str]]] = {
    # aspect: (how often reviews mention it, phrasings with {v} the fact's key)
    "battery": (
        0.30,
        [
            "Battery easily gets me {v} between charges.",
            "I measured about {v} of battery life.",
            "{v} on a single charge, which is more than I need.",
            "The battery lasts {v}, as advertised.",
        ],
    ),
    "price": (
        0.20,
        [
            "I paid {v} and think it is fair.",
            "For {v} you get a lot.",
            "Got it for {v} during a sale.",
            "At {v} it is not cheap, but it feels worth it.",
        ],
    ),
    "delivery": (
        0.14,
        [
            "Delivery took {v}.",
            "It arrived after {v}, packed well.",
            "Shipping was slow: {v} from order to doorstep.",
        ],
    ),
    "colour": (
        0.10,
        [
            "Mine is the {v} one and it looks great.",
            "The {v} finish hides fingerprints.",
            "I chose {v}; the photos do not do it justice.",
        ],
    ),
    "weight": (
        0.08,
        [
            "It weighs {v}, light enough to carry all day.",
            "At {v} it is heavier than I hoped.",
        ],
    ),
    "setup": (
        0.07,
        [
            "Setup took {v} with the app.",
            "I had it running in {v}.",
        ],
    ),
    "warranty": (
        0.06,
        [
            "It comes with a {v}, which gave me peace of mind.",
            "The {v} covered my replacement.",
        ],
    ),
    "defect": (
        0.05,
        [
            "After a month the {v} started to wobble.",
            "My only complaint: the {v} feels flimsy.",
        ],
    ),
}
REVIEW_FILLER = [
    "Would recommend it to a friend.",
    "Bought it as a birthday present for my brother.",
    "Five stars from me.",
    "The box it came in was nicer than expected.",
    "Will update this review after a few months.",
    "My partner uses it more than I do.",
    "I compared it with two others before buying.",
    "The manual is short and clear.",
    "Overall a solid purchase.",
    "Not perfect, but close.",
]
REVIEW_QUESTIONS = {
    "battery": "How long does the battery of the {p} last, according to reviewers?",
    "price": "How much did reviewers pay for the {p}?",
    "delivery": "How long did delivery of the {p} take?",
    "colour": "What colour is the {p} that reviewers bought?",
    "weight": "How much does the {p} weigh?",
    "setup": "How long does setting up the {p} take?",
    "warranty": "What warranty does the {p} come with?",
    "defect": "Which part of the {p} do reviewers complain about?",
}


def _review_facts(rng: random.Random) -> dict[str, str]:
    return {
        "battery": f"{rng.randint(6, 60)} hours",
        "price": f"${rng.randint(29, 399)}",
        "delivery": f"{rng.randint(2, 21)} days",
        "colour": rng.choice(COLOURS),
        "weight": f"{rng.randint(12, 95) * 10} grams",
        "setup": f"{rng.randint(3, 45)} minutes",
        "warranty": f"{rng.randint(1, 5)}-year warranty",
        "defect": rng.choice(DEFECTS),
    }


def reviews(products: int = 8, per_product: int = 80, seed: int = 0) -> Corpus:
    """`per_product` reviews of each of `products` products (at most len(PRODUCTS))."""
    rng = random.Random(seed)
    corpus = Corpus("reviews")
    aspects = list(REVIEW_ASPECTS)
    weights = [REVIEW_ASPECTS[a][0] for a in aspects]
    for p, product in enumerate(PRODUCTS[:products]):
        facts = _review_facts(rng)
        # every fact is stated at least twice, however rare its aspect
        mentioned = [a for a in aspects for _ in range(2)]
        while len(mentioned) < per_product:
            mentioned.append(rng.choices(aspects, weights)[0])
        rng.shuffle(mentioned)
        for r, aspect in enumerate(mentioned[:per_product]):
            said = [aspect]
            if rng.random() < 0.4:
                said.append(rng.choices(aspects, weights)[0])
            sentences = [
                rng.choice(REVIEW_ASPECTS[a][1]).format(v=facts[a]) for a in dict.fromkeys(said)
            ]
            sentences += rng.sample(REVIEW_FILLER, rng.choice([0, 1, 1, 2]))
            rng.shuffle(sentences)
            text = " ".join(sentences)
            corpus.items.append(
                ({"text": text, "id": f"p{p}r{r}", "metadata": {"product": product}}, {})
            )
        where = {"filters": {"product": product}}
        corpus.broad.append(
            (Question(f"What do reviewers say about the {product}?", tuple(facts.values())), where)
        )
        for aspect in rng.sample(aspects, 3):
            question = REVIEW_QUESTIONS[aspect].format(p=product)
            corpus.short.append((Question(question, (facts[aspect],), answer=facts[aspect]), where))
    return corpus


# -- chats (held out) ---------------------------------------------------------------------

PEOPLE = ["Priya", "Tomasz", "Amara", "Kenji", "Lucia", "Obi", "Freya", "Mateo", "Salma", "Ivan"]
CITIES = ["Porto", "Tampere", "Ljubljana", "Adelaide", "Halifax", "Kraków", "Busan", "Valparaíso"]
JOBS = ["welder", "pediatric nurse", "bus driver", "pastry chef", "tax auditor", "luthier"]
PETS = ["Biscuit", "Pepper", "Mochi", "Rufus", "Juniper", "Pistachio", "Ziggy"]
SISTERS = ["Hana", "Greta", "Nadia", "Olive", "Rosa", "Tamsin"]
SPORTS = ["bouldering", "water polo", "fencing", "ultimate frisbee", "rowing", "curling"]
ALLERGIES = ["peanuts", "shellfish", "penicillin", "cat dander", "kiwi", "sesame"]
CARS = ["Skoda Octavia", "Honda Jazz", "Fiat Panda", "Volvo V70", "Mazda MX-5", "Kia Niro"]
INSTRUMENTS = ["cello", "banjo", "trombone", "harmonica", "oboe", "ukulele"]
CHAT_ASPECTS: dict[str, tuple[float, list[str]]] = {
    "city": (
        0.22,
        [
            "it's pouring again here in {v}, typical",
            "any good bakeries you'd recommend in {v}?",
            "traffic in {v} was a nightmare this morning",
            "moving to {v} was the best decision I made",
        ],
    ),
    "pet": (
        0.20,
        [
            "{v} knocked my coffee off the table again lol",
            "need to take {v} to the vet on thursday",
            "what's a good toy for a dog like {v}?",
        ],
    ),
    "job": (
        0.16,
        [
            "long shift today, being a {v} is exhausting",
            "can you help me write my CV? I've worked as a {v} for six years",
            "my boss wants me to train the new {v} next week",
        ],
    ),
    "sport": (
        0.12,
        [
            "sore everywhere after {v} practice",
            "we lost the {v} match on sunday, gutted",
            "tips for getting better at {v}?",
        ],
    ),
    "sister": (
        0.10,
        [
            "my sister {v} is visiting this weekend",
            "need a birthday gift idea for {v}, she's my little sister",
            "{v} (my sister) says hi",
        ],
    ),
    "car": (
        0.08,
        [
            "the {v} is making a weird noise again",
            "how often should I service my {v}?",
        ],
    ),
    "allergy": (
        0.07,
        [
            "remember I'm allergic to {v} when you suggest recipes",
            "had a reaction at dinner, pretty sure it had {v} in it",
        ],
    ),
    "instrument": (
        0.05,
        [
            "finally learned that song on the {v}",
            "my {v} needs new strings or reeds or whatever, help",
        ],
    ),
}
CHAT_NOISE = [
    "can you set a reminder for 5pm",
    "what's 15% of 240",
    "thanks, that helps",
    "tell me a joke",
    "draft a polite email declining a meeting",
    "how do I boil an egg properly",
    "ok never mind",
    "summarize this article for me please",
    "what's the capital of Mongolia",
    "good morning!",
    "convert 30 miles to km",
    "recommend a podcast about history",
]
CHAT_QUESTIONS = {
    "city": "Which city does {n} live in?",
    "pet": "What is the name of {n}'s pet?",
    "job": "What does {n} do for a living?",
    "sport": "Which sport does {n} play?",
    "sister": "What is the name of {n}'s sister?",
    "car": "What car does {n} drive?",
    "allergy": "What is {n} allergic to?",
    "instrument": "Which instrument does {n} play?",
}


def chats(people: int = 8, per_person: int = 100, seed: int = 1) -> Corpus:
    """`per_person` chat messages of each of `people` people (at most len(PEOPLE))."""
    rng = random.Random(seed)
    corpus = Corpus("chats")
    aspects = list(CHAT_ASPECTS)
    weights = [CHAT_ASPECTS[a][0] for a in aspects]
    for p, person in enumerate(PEOPLE[:people]):
        facts = {
            "city": rng.choice(CITIES),
            "job": rng.choice(JOBS),
            "pet": rng.choice(PETS),
            "sister": rng.choice(SISTERS),
            "sport": rng.choice(SPORTS),
            "allergy": rng.choice(ALLERGIES),
            "car": rng.choice(CARS),
            "instrument": rng.choice(INSTRUMENTS),
        }
        turns: list[str] = [a for a in aspects for _ in range(2)]
        while len(turns) < per_person:
            turns.append(rng.choices(aspects, weights)[0] if rng.random() < 0.6 else "")
        rng.shuffle(turns)
        for t, aspect in enumerate(turns[:per_person]):
            if aspect:
                text = rng.choice(CHAT_ASPECTS[aspect][1]).format(v=facts[aspect])
            else:
                text = rng.choice(CHAT_NOISE)
            corpus.items.append(({"text": text, "id": f"u{p}m{t}"}, {"user_id": person}))
        where = {"user_id": person}
        corpus.broad.append(
            (Question("Tell me everything you know about my life.", tuple(facts.values())), where)
        )
        for aspect in rng.sample(aspects, 3):
            question = CHAT_QUESTIONS[aspect].format(n="the user")
            corpus.short.append((Question(question, (facts[aspect],), answer=facts[aspect]), where))
    return corpus


# -- tickets (held out) -------------------------------------------------------------------

ACCOUNTS = [
    "Brightwater Logistics",
    "Calder & Finch",
    "Dunmore Analytics",
    "Everly Health",
    "Foxglove Studios",
    "Garnet Mining",
    "Harbourview Schools",
    "Ironleaf Farms",
    "Juniper Legal",
    "Kestrel Aviation",
]
PLANS = ["Starter plan", "Team plan", "Business plan", "Enterprise plan", "Nonprofit plan"]
REGIONS = ["eu-west-2", "us-east-1", "ap-southeast-1", "ca-central-1", "sa-east-1", "eu-north-1"]
SIGN_ON = ["Okta", "OneLogin", "Azure AD", "Ping Identity", "JumpCloud", "Keycloak"]
INTEGRATIONS = ["Salesforce", "Zendesk", "NetSuite", "HubSpot", "Jira", "Workday"]
MANAGERS = ["Dana Whitlock", "Ravi Menon", "Sofia Lindqvist", "Marcus Bell", "Ines Carvalho"]
MONTHS = ["January", "March", "April", "June", "August", "September", "October", "December"]
TICKET_ASPECTS: dict[str, tuple[float, list[str]]] = {
    "error": (
        0.25,
        [
            "Users see {v} when exporting reports",
            "the screenshot they attached shows {v} on the dashboard",
            "{v} is back after the latest release",
            "the nightly job failed with {v} again",
        ],
    ),
    "integration": (
        0.20,
        [
            "the {v} connector stopped syncing overnight",
            "they need help mapping custom fields to {v}",
            "webhook deliveries to {v} are delayed by hours",
        ],
    ),
    "sign_on": (
        0.15,
        [
            "login through {v} fails since the certificate rotation",
            "they authenticate with {v} and want provisioning turned on",
            "{v} sessions expire after ten minutes for some users",
        ],
    ),
    "seats": (
        0.10,
        [
            "the admin wants to add people beyond their {v}",
            "billing confirms they pay for {v}",
        ],
    ),
    "region": (
        0.10,
        [
            "their workspace is hosted in {v}",
            "the data residency review confirmed {v} as their region",
        ],
    ),
    "plan": (
        0.08,
        [
            "per the contract they are on the {v}",
            "they asked whether the export limit applies on the {v}",
        ],
    ),
    "manager": (
        0.07,
        [
            "looping in {v}, who manages the account",
            "{v} from account management asked for an update",
        ],
    ),
    "renewal": (
        0.05,
        [
            "finance notes the contract renews in {v}",
            "please prioritise, their renewal is due in {v}",
        ],
    ),
}
TICKET_NOTES = [
    "Cleared the cache and asked the user to retry",
    "Escalated to tier two",
    "Closed as resolved after the customer confirmed",
    "Asked for a HAR file and browser version",
    "Reproduced on staging",
    "Linked to the known incident on the status page",
    "Sent the standard troubleshooting checklist",
    "No reply for three days, so auto-closing",
    "Priority set to medium",
    "Customer thanked the team for the quick turnaround",
]
TICKET_QUESTIONS = {
    "error": "Which error code does {a} keep running into?",
    "integration": "Which integration does {a} use with our product?",
    "sign_on": "Which single sign-on provider does {a} use?",
    "seats": "How many seats does {a} pay for?",
    "region": "In which data region is {a} hosted?",
    "plan": "Which plan is {a} on?",
    "manager": "Who is the account manager for {a}?",
    "renewal": "In which month does the contract of {a} renew?",
}


def tickets(accounts: int = 8, per_account: int = 80, seed: int = 2) -> Corpus:
    """`per_account` support tickets about each of `accounts` accounts (at most
    len(ACCOUNTS)); a ticket's sentences are support notes, the first one led by its number."""
    rng = random.Random(seed)
    corpus = Corpus("tickets")
    aspects = list(TICKET_ASPECTS)
    weights = [TICKET_ASPECTS[a][0] for a in aspects]
    for a, account in enumerate(ACCOUNTS[:accounts]):
        facts = {
            "error": f"ERR-{rng.randint(1000, 9999)}",
            "integration": rng.choice(INTEGRATIONS),
            "sign_on": rng.choice(SIGN_ON),
            "seats": f"{rng.randint(12, 900)} seats",
            "region": rng.choice(REGIONS),
            "plan": rng.choice(PLANS),
            "manager": rng.choice(MANAGERS),
            "renewal": rng.choice(MONTHS),
        }
        # every fact is stated at least once; about one ticket in six states none
        leads: list[str] = list(aspects)
        while len(leads) < per_account:
            leads.append(rng.choices(aspects, weights)[0] if rng.random() < 0.85 else "")
        rng.shuffle(leads)
        for t, lead in enumerate(leads[:per_account]):
            said = [lead] if lead else []
            while said and len(said) < 3 and rng.random() < 0.35:
                said.append(rng.choices(aspects, weights)[0])
            notes = [
                rng.choice(TICKET_ASPECTS[x][1]).format(v=facts[x]) for x in dict.fromkeys(said)
            ]
            notes += rng.sample(TICKET_NOTES, rng.choice([1, 1, 2] if said else [1, 2, 3]))
            rng.shuffle(notes)
            number = 1000 * (a + 1) + rng.randint(0, 999)
            sentences = [f"Ticket {number}: {notes[0]}", *notes[1:]]
            text = " ".join(n[0].upper() + n[1:] + "." for n in sentences)
            corpus.items.append(({"text": text, "id": f"a{a}t{t}"}, {"session_id": account}))
        where = {"session_id": account}
        question = f"Brief me on the {account} account before my call with them."
        corpus.broad.append((Question(question, tuple(facts.values())), where))
        for aspect in rng.sample(aspects, 3):
            question = TICKET_QUESTIONS[aspect].format(a=account)
            corpus.short.append((Question(question, (facts[aspect],), answer=facts[aspect]), where))
    return corpus


GENERATORS = {"reviews": reviews, "chats": chats, "tickets": tickets}
