"""The Vulkan route on lavapipe against the CPU build, for the record: tok/s of SmolLM2
fully offloaded to Mesa's software GPU and on the CPU build, the greedy texts, and the
VRAM the estimate planned against what llama.cpp logged on the device.

    python bench/vulkan.py          # needs `make vulkan` (.venv-vulkan) and lavapipe

lavapipe runs on the same CPU cores: this checks the path, not the speed. Times are
reported, never asserted. Writes bench/results/vulkan.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aivailable.models import store  # noqa: E402
from tests.integration.vulkan_run import LAVAPIPE_ENV, VK_PYTHON, buffer_mib, run_model  # noqa: E402

MIB = 1 << 20


def main() -> int:
    if not VK_PYTHON.exists():
        print("bench/vulkan.py: no .venv-vulkan (run `make vulkan`); nothing measured")
        return 0
    model = store.resolve("builtin:smollm2-135m").path
    os.environ.update(LAVAPIPE_ENV)
    rows = {}
    for build, python, layers in (("vulkan", str(VK_PYTHON), -1), ("cpu", sys.executable, 0)):
        result, log = run_model(python, model, layers)
        result["device_buffers"] = buffer_mib(log, "Vulkan0") * MIB if build == "vulkan" else 0
        result["tok_s"] = result["tokens"] / result["gen_s"]
        rows[build] = result
    print(f"{'build':8} {'load s':>7} {'tok/s':>7}  text")
    for build, r in rows.items():
        print(f"{build:8} {r['load_s']:7.2f} {r['tok_s']:7.1f}  {r['text']!r}")
    vk = rows["vulkan"]
    planned = vk["estimate_weights"] + vk["estimate_kv"] + vk["estimate_compute"]
    print(
        f"estimate {planned / MIB:.1f} MiB (+{(vk['estimate'] - planned) / MIB:.0f} MiB runtime "
        f"overhead) vs llama.cpp's Vulkan0 buffers {vk['device_buffers'] / MIB:.1f} MiB; "
        f"device free memory dropped {((vk['free_before'] or 0) - (vk['free_after'] or 0)) / MIB:.1f} MiB"
    )
    print(f"same greedy text: {rows['vulkan']['text'] == rows['cpu']['text']}")
    out = ROOT / "bench" / "results" / "vulkan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
