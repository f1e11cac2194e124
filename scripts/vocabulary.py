#!/usr/bin/env python3
"""Regenerates anonymization/data/words/english.txt and drugs.txt, the vocabularies of the
scrubber.

Sources, both downloaded from PyPI into ~/.cache/medpipe/vocabulary:
- the "web2" list (Webster's Second New International Dictionary, 1934, public domain) as
  shipped in the `english-words` 2.0.2 wheel (MIT);
- the English word frequencies of the `pyspellchecker` 0.9.1 wheel (MIT).

A word is kept when web2 writes it in lower case (a common word, not a proper noun) and it
is in use (frequency at least 20), or when it is frequent (at least 200) and no name of the
Census lists in anonymization/data/names/ (`email`, `website`, `i'm`). Rare web2 words
(`boni`, `ruman`) are left out: a rare word is more likely a name than a word in a note.

drugs.txt: the one-word drug names and brand names (`contin`, `lasix`) of the
`drug-named-entity-recognition` 2.0.9 wheel (MIT; its dictionary is built from DrugBank's
open vocabulary, MeSH, Medline Plus, the NHS and Wikipedia), four letters or more, minus
the Census names.

    python3 scripts/vocabulary.py
"""

import bz2
import gzip
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "anonymization", "data")
WHEELS = {
    "english-words==2.0.2": "english_words-2.0.2-py3-none-any.whl",
    "pyspellchecker==0.9.1": "pyspellchecker-0.9.1-py3-none-any.whl",
    "drug-named-entity-recognition==2.0.9": "drug_named_entity_recognition-2.0.9-py3-none-any.whl",
}


def names():
    out = set()
    for f in ("first.txt", "last.txt"):
        with open(os.path.join(DATA, "names", f), encoding="utf-8") as fh:
            out.update(l.strip() for l in fh if l.strip() and not l.startswith("#"))
    return out


def wheel(cache, spec):
    path = os.path.join(cache, WHEELS[spec])
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", spec, "-d", cache],
            check=True,
        )
    return zipfile.ZipFile(path)


def main():
    cache = os.path.expanduser("~/.cache/medpipe/vocabulary")
    with wheel(cache, "english-words==2.0.2") as z:
        # The wheel's own data file: a pickled Python set of strings.
        web2 = pickle.loads(z.read("english_words/data/web2.pickle"))
    with wheel(cache, "pyspellchecker==0.9.1") as z:
        freq = json.loads(gzip.decompress(z.read("spellchecker/resources/en.json.gz")))
    listed = names()
    words = set()
    for w in web2:
        if w.isalpha() and len(w) >= 2 and w.islower() and freq.get(w, 0) >= 20:
            words.add(w)
    for w, n in freq.items():
        if n >= 200 and w not in listed and re.fullmatch(r"[a-z]+(?:['-][a-z]+)*", w):
            words.add(w)
    out = os.path.join(DATA, "words", "english.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(sorted(words)) + "\n")
    print(f"Wrote {len(words)} words to {os.path.normpath(out)}.")

    with wheel(cache, "drug-named-entity-recognition==2.0.9") as z:
        drugs = pickle.loads(
            bz2.decompress(z.read("drug_named_entity_recognition/drug_ner_dictionary.pkl.bz2"))
        )
    names_of_drugs = set()
    for variant in drugs["drug_variant_to_canonical"]:
        v = variant.lower()
        if len(v) >= 4 and v not in listed and re.fullmatch(r"[a-z]+(?:-[a-z]+)*", v):
            names_of_drugs.add(v)
    out = os.path.join(DATA, "words", "drugs.txt")
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(sorted(names_of_drugs)) + "\n")
    print(f"Wrote {len(names_of_drugs)} drug names to {os.path.normpath(out)}.")


if __name__ == "__main__":
    main()
