"""One row's peak memory, in a fresh process: ``python -m export.bench_memory '<json request>'`` loads the row's
system (a runtime backend on an engines folder, or HF ``generate``), answers the bench's question once for the
row's batch, and prints the process's peak resident set size in MiB (imports included: what a deployment of that
system holds). Run by ``export/bench.py``; not a user command."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.memory import peak_rss_bytes


def main(argv: list[str] | None = None) -> int:
    request = json.loads((sys.argv[1:] if argv is None else argv)[0])
    row = request["row"]
    from export.bench import sample_images

    images = sample_images(row["batch"], tuple(request["image_size"]))
    questions = [request["question"]] * row["batch"]
    if request["baseline"]:
        from export.bench_systems import HF_SYSTEMS
        from runtime.manifest import Manifest

        manifest = Manifest.load(Path(row["engines"]), verify=False)  # the prompt the runtime rows use
        system = HF_SYSTEMS[manifest.family](Path(request["model"]), request["baseline"], manifest,
                                             threads=request["threads"] or None)
    else:
        from export.bench_systems import PipelineSystem
        from runtime.backends.ort import OrtSettings

        backend = row["system"]
        settings = OrtSettings(threads=request["threads"], spinning=False) if backend.startswith("ort") else None
        system = PipelineSystem(Path(row["engines"]), backend, settings)
    system.run(images, questions, request["new_tokens"])
    print(peak_rss_bytes() / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
