"""A small synthetic financial-sentiment set, generated offline from templates: `make data
SYNTHETIC=1` (docs/DATA.md). Invented headlines whose sentiment is unambiguous by construction:
a smoke-test set, not a benchmark.
"""

from __future__ import annotations

import random

COMPANIES = [
    "Acme Corp", "Northwind Traders", "Globex", "Initech", "Umbrella Holdings", "Stark Industries",
    "Wayne Enterprises", "Hooli", "Vandelay Industries", "Soylent Foods", "Cyberdyne Systems",
    "Tyrell Energy", "Wonka Confectionery", "Oscorp", "Aperture Labs", "Gringotts Bank",
    "Blue Sun Logistics", "Monarch Steel", "Dunder Paper", "Pied Piper Networks",
]
UNITS = ["quarterly", "annual", "first-half", "third-quarter"]
CITIES = ["Helsinki", "Frankfurt", "Toronto", "Singapore", "Chicago", "Madrid", "Oslo", "Sydney"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]

TEMPLATES = {
    "positive": [
        "{co} shares jump {pct}% after record {unit} profit",
        "{co} raises full-year revenue guidance on strong demand",
        "{co} beats analyst estimates as sales climb {pct}%",
        "Analysts upgrade {co} to buy after {unit} earnings surge",
        "{co} {unit} net profit rises {pct}% to {amt} million euros",
        "{co} wins {amt} million contract, boosting order backlog",
        "{co} increases dividend by {pct}% after strong cash flow",
    ],
    "negative": [
        "{co} shares plunge {pct}% after profit warning",
        "{co} cuts {n} jobs as sales slump",
        "{co} misses earnings estimates and lowers its outlook",
        "{co} reports {unit} loss of {amt} million euros",
        "Analysts downgrade {co} to sell as margins shrink",
        "{co} {unit} revenue falls {pct}% amid weak demand",
        "{co} suspends dividend after {unit} loss widens",
    ],
    "neutral": [
        "{co} to hold its annual general meeting in {city}",
        "{co} appoints a new chief financial officer",
        "{co} will publish {unit} results on {day}",
        "{co} moves its head office to {city}",
        "{co} completes previously announced change of auditor",
        "{co} lists {n} new bonds on the {city} exchange",
        "{co} says its chairman will present at an investor conference on {day}",
    ],
}


def generate(n: int = 300, seed: int = 42) -> list[dict]:
    """`n` distinct rows `{"text", "label"}`, balanced over the three labels, seeded."""
    rng = random.Random(seed)
    labels = sorted(TEMPLATES)
    rows, seen = [], set()
    per_label = {lab: n // 3 + (1 if i < n % 3 else 0) for i, lab in enumerate(labels)}
    for lab in labels:
        made = 0
        while made < per_label[lab]:
            text = rng.choice(TEMPLATES[lab]).format(
                co=rng.choice(COMPANIES), unit=rng.choice(UNITS), city=rng.choice(CITIES),
                day=rng.choice(DAYS), pct=rng.randint(2, 45), amt=rng.randint(5, 900), n=rng.randint(20, 2500),
            )
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": lab})
            made += 1
    rng.shuffle(rows)
    return rows
