"""The README's quickstart, runnable as is: remember, recall, filter, pack a context."""

from memlayer import Memory

with Memory(path="./agent-memory") as memory:
    memory.add("Ada prefers window seats.", user_id="ada", metadata={"kind": "pref"})
    memory.add("Ada's passport expires in March 2027.", user_id="ada", metadata={"kind": "doc"})
    memory.add("Bob is vegetarian.", user_id="bob")

    for hit in memory.search("where does Ada like to sit?", k=2, user_id="ada"):
        print(f"{hit.score:.3f}  {hit.text}")

    docs = memory.search("travel documents", filters={"kind": {"$eq": "doc"}}, user_id="ada")
    print(docs[0].text)

    print(memory.context("plan Ada's flight", budget_tokens=60, user_id="ada").text)
