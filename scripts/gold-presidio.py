#!/usr/bin/env python3
"""Builds a gold file for `medpipe eval deid` from data nobody on medpipe wrote.

The templates (209 sentences: support chats, letters, song trivia) and the 3,000 fake
identities (FakeNameGenerator, many of them outside the US) come from the
`presidio-evaluator` 0.3.2 wheel on PyPI (MIT; the FakeNameGenerator file is CC BY-SA 3.0
US). Nothing of it is committed here: the wheel is downloaded into the cache directory.

Each template slot that is a Safe Harbor identifier becomes a gold span; slots that are not
(country, state, organisation, job, year, weekday, an age under 90) are filled as plain
text, so precision is measured too.

    python3 scripts/gold-presidio.py --out /tmp/presidio.jsonl [--sentences 3000] [--seed 1]
    medpipe eval deid --gold /tmp/presidio.jsonl
"""

import argparse
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
import zipfile

WHEEL = "presidio_evaluator-0.3.2-py3-none-any.whl"
RAW = "presidio_evaluator/data_generator/raw_data/"


def wheel(cache):
    path = os.path.join(cache, WHEEL)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "presidio-evaluator==0.3.2", "-d", cache],
            check=True,
        )
    return zipfile.ZipFile(path)


def digits(r, n):
    return "".join(r.choice("0123456789") for _ in range(n))


class Sentence:
    def __init__(self):
        self.text = ""
        self.spans = []

    def add(self, s, kind=None):
        if kind and s:
            start = len(self.text)
            self.spans.append({"start": start, "end": start + len(s), "type": kind})
        self.text += s


def fill(slot, p, r, out):
    """Appends the value of `slot` for person `p` to `out`; False for unknown slots."""
    full = f"{p['GivenName']} {p['Surname']}"
    if r.random() < 0.3:
        full = f"{p['GivenName']} {p['MiddleInitial']}. {p['Surname']}"
    street = p["StreetAddress"]
    number, _, name = street.partition(" ")
    if not number[:1].isdigit():
        number, name = "", street
    if slot in ("person", "name", "name_female", "name_male"):
        out.add(full, "NAME")
    elif slot.startswith("first_name"):
        out.add(p["GivenName"], "NAME")
    elif slot.startswith("last_name"):
        out.add(p["Surname"], "NAME")
    elif slot.startswith("prefix"):
        out.add(p["Title"])
    elif slot == "address":
        out.add(street, "ADDRESS")
        out.add(", ")
        out.add(p["City"], "ADDRESS")
        out.add(", ")
        out.add(p["State"])
        out.add(" ")
        out.add(p["ZipCode"], "ADDRESS")
    elif slot == "street_name":
        out.add(name, "ADDRESS")
    elif slot == "building_number":
        out.add(number or digits(r, 3), "ADDRESS")
    elif slot == "secondary_address":
        out.add(f"Apt. {digits(r, 3)}", "ADDRESS")
    elif slot == "city":
        out.add(p["City"], "ADDRESS")
    elif slot in ("zipcode", "postcode"):
        out.add(p["ZipCode"], "ADDRESS")
    elif slot == "state_abbr":
        out.add(p["State"])
    elif slot == "phone_number":
        out.add(p["TelephoneNumber"], "PHONE")
    elif slot == "email":
        out.add(p["EmailAddress"], "EMAIL")
    elif slot == "url":
        out.add(f"https://www.{p['Domain'].lower()}/", "URL")
    elif slot == "ip_address":
        out.add(".".join(str(r.randrange(256)) for _ in range(4)), "IP")
    elif slot == "ssn":
        out.add(f"{digits(r, 3)}-{digits(r, 2)}-{digits(r, 4)}", "ID")
    elif slot == "credit_card_number":
        out.add(" ".join(digits(r, 4) for _ in range(4)) if r.random() < 0.5 else digits(r, 16), "ID")
    elif slot == "iban":
        out.add(f"DE{digits(r, 2)} {digits(r, 4)} {digits(r, 4)} {digits(r, 4)} {digits(r, 4)} {digits(r, 2)}", "ID")
    elif slot == "us_driver_license":
        out.add(f"{r.choice('ABCDEFGHJKLMNPRSTWY')}{digits(r, 7)}", "ID")
    elif slot == "date_of_birth":
        out.add(p["Birthday"], "DATE")
    elif slot == "date_time":
        out.add(f"{r.randint(1950, 2024)}-{r.randint(1, 12):02}-{r.randint(1, 28):02} "
                f"{r.randint(0, 23):02}:{r.randint(0, 59):02}", "DATE")
    elif slot == "age":
        age = r.randint(90, 104) if r.random() < 0.3 else int(p["Age"] or 40)
        out.add(str(age), "AGE" if age > 89 else None)
    elif slot == "year":
        out.add(str(r.randint(1950, 2024)))
    elif slot == "day_of_week":
        out.add(r.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]))
    elif slot in ("country", "nation_woman", "nation_plural", "nationality"):
        out.add(p["CountryFull"])
    elif slot == "organization":
        out.add(p["Company"])
    elif slot == "job":
        out.add(p["Occupation"])
    else:
        return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sentences", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/medpipe/presidio"))
    a = ap.parse_args()
    z = wheel(a.cache)
    templates = [
        t.strip().replace("\\n", "\n")
        for t in z.read(RAW + "templates.txt").decode("utf-8", "replace").splitlines()
        if t.strip()
    ]
    people = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(io.StringIO(z.read(RAW + "FakeNameGenerator.com_3000.csv").decode("utf-8-sig")))]
    r = random.Random(a.seed)
    slot = re.compile(r"\{\{([a-z_]+)\}\}")
    spans = 0
    with open(a.out, "w", encoding="utf-8") as f:
        for i in range(a.sentences):
            t = templates[i % len(templates)]
            s = Sentence()
            at = 0
            for m in slot.finditer(t):
                s.add(t[at:m.start()])
                if not fill(m.group(1), r.choice(people), r, s):
                    s.add(m.group(0))
                at = m.end()
            s.add(t[at:])
            spans += len(s.spans)
            f.write(json.dumps({"text": s.text, "spans": s.spans}, ensure_ascii=False) + "\n")
    print(f"Wrote {a.sentences} sentences with {spans} gold spans to {a.out}.")


if __name__ == "__main__":
    main()
