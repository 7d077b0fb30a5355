#!/usr/bin/env python3
"""Picks the few inputs a fuzzing run found that are worth committing as seeds.

    scripts/fuzz_pick_corpus.py TARGET [KEEP=20] [MAX_BYTES=4096]

After scripts/fuzz.sh, fuzz/work/corpus/TARGET/ holds thousands of inputs. This runs
libFuzzer's merge over the committed seeds (fuzz/corpus/TARGET/, counted as already
known) and the found inputs, reads from its control file which coverage features each
found input added first, and copies the KEEP inputs (each at most MAX_BYTES) that added
the most to fuzz/corpus/TARGET/found-<sha1 prefix>. The replay test then runs them
(files not named valid-*/invalid-* must only not panic). Re-running it adds nothing new
for inputs already kept.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    target = sys.argv[1]
    keep = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seeds = os.path.join(root, "fuzz", "corpus", target)
    found = os.path.join(root, "fuzz", "work", "corpus", target)
    triple = f"{platform.machine()}-unknown-linux-gnu"
    binary = os.path.join(root, "fuzz", "target", triple, "release", target)
    for path in (seeds, found, binary):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run scripts/fuzz.sh {target} first")

    with tempfile.TemporaryDirectory() as tmp:
        known = os.path.join(tmp, "known")
        shutil.copytree(seeds, known)
        control = os.path.join(tmp, "control")
        # The first directory's files are processed first and count as the corpus
        # already held: the features of every later file are those it adds.
        subprocess.run(
            [binary, "-merge=1", f"-merge_control_file={control}", known, found],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(control) as f:
            lines = f.read().splitlines()
    count = int(lines[0])
    files = lines[2 : 2 + count]
    added = {}
    for line in lines[2 + count :]:
        if line.startswith("FT "):
            _, index, *features = line.split()
            added[int(index)] = len(features)

    def is_new(i: int) -> bool:
        path = files[i]
        return path.startswith(found) and os.path.getsize(path) <= max_bytes

    ranked = sorted((i for i in added if added[i] and is_new(i)), key=lambda i: -added[i])
    kept = 0
    for i in ranked[:keep]:
        data = open(files[i], "rb").read()
        name = "found-" + hashlib.sha1(data).hexdigest()[:12]
        dest = os.path.join(seeds, name)
        if not os.path.exists(dest):
            with open(dest, "wb") as f:
                f.write(data)
            kept += 1
        print(f"{name}  {len(data):5d} bytes  {added[i]:4d} new features")
    print(f"{target}: {kept} new seeds in fuzz/corpus/{target}/ ({len(ranked)} candidates)")


if __name__ == "__main__":
    main()
