"""Runs the Triton ops on CPU tensors in Triton's interpreter, in a fresh process.

Triton decides at decoration time (for its own standard library: at `import triton`)
whether kernels are interpreted, so TRITON_INTERPRET=1 only works when set before triton is
first imported. A pytest process may have imported triton long before these tests run;
the tests therefore start this script with the variable set in a clean environment.

Usage: python gpu_interpret_worker.py IN.safetensors OUT.safetensors

IN holds tensors named "<case>/<arg>" and metadata "cases": a JSON list of
{"name", "op": "align"|"fused", "block_size"?, "num_slots"?, "config"?: {...}|null}.
OUT holds "<case>/<output>" (align: sorted_ids, expert_ids, num_post; fused: y) and
metadata "errors": a JSON object case -> error message for cases that raised.
"""
from __future__ import annotations

import json
import os
import sys


def _run(path_in: str, path_out: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("gpu_interpret_worker: TRITON_INTERPRET=1 must be set")
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moe.gpu_kernels import FusedMoELaunchConfig, fused_moe, invoke_fused_moe, moe_align

    tensors, cases = {}, []
    with safe_open(path_in, framework="pt") as f:
        cases = json.loads(f.metadata()["cases"])
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    out, errors = {}, {}
    for case in cases:
        name = case["name"]
        arg = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == name}
        try:
            if case["op"] == "align":
                res = moe_align(arg["topk_ids"], case["block_size"], case["num_slots"], arg.get("expert_map"))
                for key, t in zip(("sorted_ids", "expert_ids", "num_post"), res):
                    out[f"{name}/{key}"] = t.contiguous()
            else:
                x, w13, w2 = arg["x"], arg["w13"], arg["w2"]
                if "w13_pool" in arg:  # weights viewed out of a larger slot pool: strided
                    w13, w2 = arg["w13_pool"][1::2], arg["w2_pool"][1::2]
                ids, weights = arg["topk_ids"], arg["topk_weights"]
                if case.get("transposed_weights"):
                    weights = arg["topk_weights_KT"].t()
                if case.get("config") is None:
                    y = fused_moe(x, w13, w2, ids, weights, arg.get("expert_map"))
                else:
                    cfg = FusedMoELaunchConfig.from_dict(case["config"])
                    y = invoke_fused_moe(x, w13, w2, ids, weights, arg.get("expert_map"), config=cfg)
                out[f"{name}/y"] = y.contiguous()
        except Exception as exc:  # reported per case so one failure does not hide the rest
            errors[name] = f"{type(exc).__name__}: {exc}"
    save_file(out, path_out, metadata={"errors": json.dumps(errors)})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    _run(sys.argv[1], sys.argv[2])
