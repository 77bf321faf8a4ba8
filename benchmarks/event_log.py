"""A synthetic surveillance log for the text-frame video benchmark: one line per frame.

Routine frames ("camera 2: a grey sedan drives past the loading dock") repeat a small
vocabulary; planted events are unique ("a man in a yellow raincoat climbs the fence") and
each comes with a question whose answer is the event's timestamp. Same seed, same log.
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
EVENTS = [
    ("a man in a yellow raincoat climbs over the north fence", "a man climb over the north fence"),
    ("a red fire engine stops at the fuel pumps", "a red fire engine stop at the fuel pumps"),
    ("a child drops a purple balloon near the fountain", "a child drop a purple balloon"),
    ("a horse trailer blocks the exit ramp", "a horse trailer block the exit ramp"),
    ("two dogs chase a pigeon across the roof", "two dogs chase a pigeon across the roof"),
    ("a window cleaner falls from a ladder", "a window cleaner fall from a ladder"),
    ("smoke rises from the bakery chimney", "smoke rise from the bakery chimney"),
    ("a woman with an orange umbrella dances in the rain", "a woman dance with an orange umbrella"),
    (
        "a pizza scooter crashes into the bicycle rack",
        "a pizza scooter crash into the bicycle rack",
    ),
    ("an ice cream truck plays music at the gate", "an ice cream truck play music at the gate"),
    ("a helicopter lands on the hospital roof", "a helicopter land on the hospital roof"),
    ("a boy loses a kite in the oak tree", "a boy lose a kite in the oak tree"),
    ("a street musician plays a violin by the bus stop", "a street musician play a violin"),
    ("a tractor pulls a broken tram along the avenue", "a tractor pull a broken tram"),
    ("a flock of geese walks through the lobby doors", "a flock of geese walk through the lobby"),
    ("a stranger paints a blue star on the wall", "a stranger paint a blue star on the wall"),
    ("the power fails and every street lamp goes dark", "every street lamp go dark"),
    ("a courier on roller skates delivers a cake", "a courier on roller skates deliver a cake"),
    ("a crane lifts a white boat onto the quay", "a crane lift a white boat onto the quay"),
    ("a goat escapes from the petting zoo van", "a goat escape from the petting zoo van"),
]


@dataclass(frozen=True)
class Event:
    """A planted event: its frame, its time, its text and the question asking when it was."""

    frame: int
    timestamp: float
    text: str
    question: str


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
    chosen = rng.sample(EVENTS * (events // len(EVENTS) + 1), events)
    for number, (text, ask) in enumerate(chosen):
        low = number * span // events
        high = max(low, (number + 1) * span // events - 1)
        index = rng.randint(low, high)
        line = f"camera {rng.randint(1, 6)}: {text}"
        log[index] = (log[index][0], line)
        planted.append(Event(index, log[index][0], line, f"At what time did {ask}?"))
    return log, planted
