"""A synthetic surveillance log for the text-frame video benchmark: one line per frame.

Routine frames ("camera 2: a grey sedan drives past the loading dock") repeat a small
vocabulary; planted events are unique ("a man in a yellow raincoat climbs the fence", up to
40 distinct ones) and each carries what questions about it check: its key words (what an
answer about it must hold), a code of its own ("Falcon-4821", for passkey-style frames) and a
"when did ...?" question whose answer is its timestamp. Same seed, same log.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS = ["grey", "white", "black", "blue", "silver", "dark green", "beige"]
VEHICLES = ["sedan", "pickup truck", "delivery van", "hatchback", "taxi", "bus", "motorbike"]
PEOPLE = ["a woman", "a man", "two people", "a cyclist", "a jogger", "a security guard"]
PLACES = ["the loading dock", "the main entrance", "the car park", "the side street", "gate A"]
ROUTINE = [
    "camera {cam}: a {colour} {vehicle} drives past {place}",
    "camera {cam}: {person} walks along {place}",
    "camera {cam}: {person} waits near {place}",
    "camera {cam}: a {colour} {vehicle} slows down at {place}",
    "camera {cam}: nothing moves at {place}",
]
# (event, its paraphrase for "when?" questions, its key: words an answer about it must hold)
EVENTS = [
    (
        "a man in a yellow raincoat climbs over the north fence",
        "a man climb over the north fence",
        "yellow raincoat",
    ),
    (
        "a red fire engine stops at the fuel pumps",
        "a red fire engine stop at the fuel pumps",
        "fire engine",
    ),
    (
        "a child drops a purple balloon near the fountain",
        "a child drop a purple balloon",
        "purple balloon",
    ),
    (
        "a horse trailer blocks the exit ramp",
        "a horse trailer block the exit ramp",
        "horse trailer",
    ),
    (
        "two dogs chase a pigeon across the roof",
        "two dogs chase a pigeon across the roof",
        "pigeon",
    ),
    (
        "a window cleaner falls from a ladder",
        "a window cleaner fall from a ladder",
        "window cleaner",
    ),
    ("smoke rises from the bakery chimney", "smoke rise from the bakery chimney", "bakery"),
    (
        "a woman with an orange umbrella dances in the rain",
        "a woman dance with an orange umbrella",
        "orange umbrella",
    ),
    (
        "a pizza scooter crashes into the bicycle rack",
        "a pizza scooter crash into the bicycle rack",
        "pizza",
    ),
    (
        "an ice cream truck plays music at the gate",
        "an ice cream truck play music at the gate",
        "ice cream",
    ),
    (
        "a helicopter lands on the hospital roof",
        "a helicopter land on the hospital roof",
        "helicopter",
    ),
    ("a boy loses a kite in the oak tree", "a boy lose a kite in the oak tree", "kite"),
    (
        "a street musician plays a violin by the bus stop",
        "a street musician play a violin",
        "violin",
    ),
    ("a tractor pulls a broken tram along the avenue", "a tractor pull a broken tram", "tractor"),
    (
        "a flock of geese walks through the lobby doors",
        "a flock of geese walk through the lobby",
        "geese",
    ),
    (
        "a stranger paints a blue star on the wall",
        "a stranger paint a blue star on the wall",
        "blue star",
    ),
    ("the power fails and every street lamp goes dark", "every street lamp go dark", "street lamp"),
    (
        "a courier on roller skates delivers a cake",
        "a courier on roller skates deliver a cake",
        "roller skates",
    ),
    ("a crane lifts a white boat onto the quay", "a crane lift a white boat onto the quay", "boat"),
    ("a goat escapes from the petting zoo van", "a goat escape from the petting zoo van", "goat"),
    ("a camel walks out of the circus truck", "a camel walk out of the circus truck", "camel"),
    (
        "a hot air balloon drifts over the car park",
        "a hot air balloon drift over the car park",
        "hot air balloon",
    ),
    ("a clown juggles torches at the entrance", "a clown juggle torches at the entrance", "clown"),
    (
        "a swarm of bees covers the ticket machine",
        "a swarm of bees cover the ticket machine",
        "bees",
    ),
    (
        "a snowplough clears the empty loading dock",
        "a snowplough clear the loading dock",
        "snowplough",
    ),
    ("a parrot lands on the barrier arm", "a parrot land on the barrier arm", "parrot"),
    (
        "a water main bursts under the side street",
        "a water main burst under the side street",
        "water main",
    ),
    (
        "a bride and groom pose beside the fountain",
        "a bride and groom pose beside the fountain",
        "bride",
    ),
    ("a pony carries a mail sack past gate A", "a pony carry a mail sack past gate A", "pony"),
    ("a piano falls off a removal lorry", "a piano fall off a removal lorry", "piano"),
    ("a fox steals a sandwich from a bench", "a fox steal a sandwich from a bench", "fox"),
    ("a drone drops a parcel on the roof", "a drone drop a parcel on the roof", "drone"),
    (
        "a tow truck drags away a golden limousine",
        "a tow truck drag away a golden limousine",
        "limousine",
    ),
    (
        "a marching band parades through the car park",
        "a marching band parade through the car park",
        "marching band",
    ),
    (
        "a tiger costume runner jumps the turnstile",
        "a runner in a tiger costume jump the turnstile",
        "tiger",
    ),
    ("a fisherman unloads a huge tuna at the quay", "a fisherman unload a huge tuna", "tuna"),
    (
        "an ambulance reverses into the flower stall",
        "an ambulance reverse into the flower stall",
        "ambulance",
    ),
    (
        "a penguin waddles out of the aquarium van",
        "a penguin waddle out of the aquarium van",
        "penguin",
    ),
    (
        "a giant inflatable duck floats in the fountain",
        "a giant inflatable duck float in the fountain",
        "duck",
    ),
    (
        "a skateboarder flips over the red bollards",
        "a skateboarder flip over the red bollards",
        "skateboarder",
    ),
]


CODE_WORDS = ["Amber", "Cobalt", "Falcon", "Maple", "Orbit", "Quartz", "Raven", "Violet", "Walnut"]


@dataclass(frozen=True)
class Event:
    """A planted event: its frame, its time, its text, the question asking when it was, its
    key words and its code."""

    frame: int
    timestamp: float
    text: str
    question: str
    key: str = ""
    code: str = ""


def event_log(
    frames: int, events: int, *, seed: int = 0, period: float = 2.0
) -> tuple[list[tuple[float, str]], list[Event]]:
    """`frames` log lines, one every `period` seconds, with `events` planted events spread
    evenly (jittered) over the log, never in the last 10%, which the local window may hold."""
    rng = random.Random(seed)
    log = []
    for index in range(frames):
        template = rng.choice(ROUTINE)
        text = template.format(
            cam=rng.randint(1, 6),
            colour=rng.choice(COLOURS),
            vehicle=rng.choice(VEHICLES),
            place=rng.choice(PLACES),
            person=rng.choice(PEOPLE),
        )
        log.append((index * period, text))
    planted = []
    span = int(frames * 0.9)
    chosen = rng.sample(EVENTS * -(-events // len(EVENTS)), events)  # distinct up to 40
    codes = rng.sample(range(1000, 10000), events)
    for number, (text, ask, key) in enumerate(chosen):
        low = number * span // events
        high = max(low, (number + 1) * span // events - 1)
        index = rng.randint(low, high)
        line = f"camera {rng.randint(1, 6)}: {text}"
        log[index] = (log[index][0], line)
        code = f"{rng.choice(CODE_WORDS)}-{codes[number]}"
        question = f"At what time did {ask}?"
        planted.append(Event(index, log[index][0], line, question, key, code))
    return log, planted
