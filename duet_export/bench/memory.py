"""Peak memory of one configuration, measured in a fresh process (`python -m duet_export.bench.memory`).

Peak resident memory is a high-water mark per process, so each configuration runs alone: load, answer one
prompt, report the peak (VmHWM). Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys


def _peak_mb() -> float:
    """This process's own high-water mark. `ru_maxrss` would not do: Linux carries the parent's peak
    across fork and exec, so every child of a large benchmark process would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv: list[str]) -> None:
    kind, path, prompt, image_path = argv[:4]
    config_json = argv[4] if len(argv) > 4 else "null"
    if kind in ("onnx", "onnx-shared"):
        from duet_export.generate import GenerationSettings
        from duet_export.runtimes import OnnxVLM, ProviderSettings

        settings = ProviderSettings(share_weights=kind == "onnx-shared")
        vlm = OnnxVLM(path, provider="cpu", settings=settings)
        vlm.generate([image_path], [prompt], GenerationSettings(max_new_tokens=4))
    else:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        from duet_export import DuetConfig, GenerationSettings, compress, generate_answers, load
        from duet_export.loading import load_visual

        loaded = load(path)
        config = json.loads(config_json)
        if config is not None:
            compress(loaded.model, DuetConfig.from_dict(config))
        image = load_visual(image_path, loaded.adapter)
        generate_answers(loaded, [image], [prompt], GenerationSettings(max_new_tokens=4))
    print(json.dumps({"peak_rss_mb": round(_peak_mb(), 1)}))


if __name__ == "__main__":
    main(sys.argv[1:])
