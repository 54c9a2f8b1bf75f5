"""Triton fused-MoE and alignment kernels against their plain-torch references, on CPU.

The kernels run in Triton's interpreter in a child process (gpu_interpret_worker.py):
TRITON_INTERPRET=1 only takes effect before triton is first imported, and other test
modules of this pytest process may already have imported it. The child runs every case
once; this module builds the inputs, computes the references here and compares.
Interpreter shapes stay tiny because it executes each program in numpy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.gpu_kernels import fused_moe_reference, moe_align_reference

# Checked without importing triton here, so this process's triton mode is left alone.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_WORKER = Path(__file__).with_name("gpu_interpret_worker.py")

# Tolerance keyed by the narrower of x's and the weights' dtypes: the kernel rounds the
# gate/up activation to the weight dtype and the output to x's dtype; the reference does not.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
_NARROW = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

D, F = 40, 24  # not multiples of the 16-wide tiles, so every edge mask is exercised
SMALL = {"block_m": 16, "block_n": 16, "block_k": 16, "group_m": 1, "num_warps": 4, "num_stages": 2}
SMALL_CFG = {"gate_up": SMALL, "down": SMALL}

# (T, E, K, dtype); the map kind cycles so every T, E, K and dtype meets both kinds.
_GRID = list(product((1, 5, 33), (4, 8), (1, 2), (torch.float32, torch.float16, torch.bfloat16)))
FUSED_CASES = [
    dict(name=f"T{T}_E{E}_K{K}_{str(dt)[6:]}_{mk}", T=T, E=E, K=K, dtype=dt, map=mk, config=SMALL_CFG)
    for i, (T, E, K, dt) in enumerate(_GRID)
    for mk in (("none", "partial")[i % 2],)
] + [
    dict(name="skewed_two_experts", T=33, E=8, K=2, dtype=torch.float32, map="none", only=(0, 5), config=SMALL_CFG),
    dict(name="all_unmapped", T=5, E=4, K=2, dtype=torch.bfloat16, map="empty", config=SMALL_CFG),
    dict(name="map_int32_ids_int32", T=5, E=4, K=2, dtype=torch.float16, map="partial32", config=SMALL_CFG),
    dict(name="x_fp32_w_bf16", T=5, E=4, K=2, dtype=torch.float32, wdtype=torch.bfloat16, map="none",
         config=SMALL_CFG),
    dict(name="x_bf16_w_fp32", T=5, E=4, K=2, dtype=torch.bfloat16, wdtype=torch.float32, map="partial",
         config=SMALL_CFG),
    dict(name="strided_pool_and_weights", T=5, E=4, K=2, dtype=torch.float32, map="partial", pool=True,
         transposed=True, config=SMALL_CFG),
    dict(name="odd_dims_block32_group2", T=33, E=8, K=2, dtype=torch.float16, map="none", D=33, F=17,
         config={"gate_up": {**SMALL, "block_m": 32, "group_m": 2}, "down": {**SMALL, "block_m": 32, "block_k": 32}}),
    dict(name="default_launch_table", T=5, E=8, K=2, dtype=torch.bfloat16, map="partial", config=None),
    dict(name="single_slot", T=6, E=1, K=1, dtype=torch.float32, map="none", config=SMALL_CFG),
    dict(name="no_tokens", T=0, E=4, K=2, dtype=torch.float32, map="none", config=SMALL_CFG),
]

# (T, K, E, block_size, map kind)
ALIGN_CASES = [
    dict(name=f"align_T{T}_K{K}_E{E}_b{b}_{mk}", T=T, K=K, E=E, block_size=b, map=mk)
    for T, K, E, b, mk in [
        (1, 1, 4, 16, "none"), (1, 2, 8, 16, "partial"), (5, 2, 8, 16, "none"), (5, 1, 4, 32, "partial"),
        (33, 2, 8, 16, "partial"), (33, 2, 4, 64, "none"), (33, 1, 8, 16, "empty"), (300, 2, 8, 16, "none"),
        (0, 2, 4, 16, "none"), (7, 2, 3, 16, "partial32"), (129, 2, 5, 32, "partial"), (6, 1, 1, 16, "none"),
        (9, 2, 20, 16, "partial"),
    ]
]

# Bad calls of the Triton ops: (case, substring the raised message must contain).
ERROR_CASES = [
    (dict(name="err_align_block_not_pow2", op="align", T=5, K=2, E=4, block_size=24, map="none"), "power of two"),
    (dict(name="err_fused_id_out_of_range", op="fused", T=5, E=4, K=2, dtype=torch.float32, map="none",
          config=SMALL_CFG, bump_id=True), "topk_ids_TK holds expert ids"),
    (dict(name="err_fused_map_value", op="fused", T=5, E=4, K=2, dtype=torch.float32, map="partial",
          config=SMALL_CFG, bad_map=True), "expert_map_E holds values"),
]


def _map(kind: str, E: int, g: torch.Generator):
    """(number of global experts G, expert_map or None) for a map kind."""
    if kind == "none":
        return E, None
    G = E + 3
    emap = torch.full((G,), -1, dtype=torch.int64)
    if kind in ("partial", "partial32"):
        # E-1 of the G experts live here, in shuffled slots; one slot stays unused.
        here = torch.randperm(G, generator=g)[: E - 1]
        emap[here] = torch.randperm(E, generator=g)[: E - 1]
    return G, emap.to(torch.int32) if kind == "partial32" else emap


def _align_inputs(case: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    G, emap = _map(case["map"], case["E"], g)
    ids = torch.randint(0, G, (case["T"], case["K"]), generator=g)
    out = {"topk_ids": ids.to(torch.int32) if case["map"] == "partial32" else ids}
    if emap is not None:
        out["expert_map"] = emap
    return out


def _fused_inputs(case: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    T, E, K = case["T"], case["E"], case["K"]
    d, f = case.get("D", D), case.get("F", F)
    wdt = case.get("wdtype", case["dtype"])
    G, emap = _map(case["map"], E, g)
    choices = torch.tensor(case.get("only", range(G)))
    # Distinct experts per token, as a router's top-k gives.
    rows = [choices[torch.randperm(len(choices), generator=g)[:K]] for _ in range(T)]
    ids = torch.stack(rows) if rows else torch.zeros(0, K, dtype=torch.int64)
    out = {
        "x": torch.randn(T, d, generator=g).to(case["dtype"]),
        "w13": (torch.randn(E, 2 * f, d, generator=g) / d**0.5).to(wdt),
        "w2": (torch.randn(E, d, f, generator=g) / f**0.5).to(wdt),
        "topk_ids": ids.to(torch.int32) if case["map"] == "partial32" else ids,
        "topk_weights": torch.rand(T, K, generator=g).softmax(-1),
    }
    if emap is not None:
        out["expert_map"] = emap
    if case.get("pool"):
        # A slot pool twice as large, of which the call sees every second slot.
        out["w13_pool"] = torch.stack([torch.zeros_like(out["w13"]), out["w13"]], 1).flatten(0, 1)
        out["w2_pool"] = torch.stack([torch.zeros_like(out["w2"]), out["w2"]], 1).flatten(0, 1)
    if case.get("transposed"):
        out["topk_weights_KT"] = out["topk_weights"].t().contiguous()
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Inputs of every case and the kernels' outputs from one interpreter run."""
    inputs, cases = {}, []
    for i, case in enumerate(ALIGN_CASES):
        inputs[case["name"]] = _align_inputs(case, 1000 + i)
        cases.append({"name": case["name"], "op": "align", "block_size": case["block_size"], "num_slots": case["E"]})
    for i, case in enumerate(FUSED_CASES):
        inputs[case["name"]] = _fused_inputs(case, 2000 + i)
        cases.append({"name": case["name"], "op": "fused", "config": case["config"],
                      "transposed_weights": bool(case.get("transposed"))})
    for i, (case, _) in enumerate(ERROR_CASES):
        if case["op"] == "align":
            inputs[case["name"]] = _align_inputs(case, 3000 + i)
            cases.append({"name": case["name"], "op": "align", "block_size": case["block_size"], "num_slots": case["E"]})
            continue
        arg = _fused_inputs(case, 3000 + i)
        if case.get("bump_id"):
            arg["topk_ids"][0, 0] = case["E"]
        if case.get("bad_map"):
            arg["expert_map"][0] = case["E"]
        inputs[case["name"]] = arg
        cases.append({"name": case["name"], "op": "fused", "config": case["config"]})
    folder = tmp_path_factory.mktemp("gpu_interpret")
    path_in, path_out = folder / "in.safetensors", folder / "out.safetensors"
    flat = {f"{name}/{k}": v.contiguous() for name, d in inputs.items() for k, v in d.items()}
    save_file(flat, str(path_in), metadata={"cases": json.dumps(cases)})
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(_WORKER), str(path_in), str(path_out)],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    outputs = {}
    with safe_open(str(path_out), framework="pt") as f:
        errors = json.loads(f.metadata()["errors"])
        for key in f.keys():
            outputs[key] = f.get_tensor(key)
    return inputs, outputs, errors


def _case_outputs(interpreted, name: str):
    inputs, outputs, errors = interpreted
    if name in errors:
        pytest.fail(f"kernel raised: {errors[name]}")
    return inputs[name], {k.split("/", 1)[1]: v for k, v in outputs.items() if k.split("/", 1)[0] == name}


@pytest.mark.parametrize("case", ALIGN_CASES, ids=lambda c: c["name"])
def test_align_kernel_equals_reference(interpreted, case):
    """The Triton alignment op returns exactly the reference's sorted ids, block slots and row count."""
    arg, out = _case_outputs(interpreted, case["name"])
    ref = moe_align_reference(arg["topk_ids"], case["block_size"], case["E"], arg.get("expert_map"))
    for key, want in zip(("sorted_ids", "expert_ids", "num_post"), ref):
        assert out[key].dtype == want.dtype, key
        assert torch.equal(out[key], want), key


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c["name"])
def test_fused_moe_kernel_matches_reference(interpreted, case):
    """The Triton fused MoE matches the per-expert torch loop within the dtype's tolerance."""
    arg, out = _case_outputs(interpreted, case["name"])
    w13, w2, weights = arg["w13"], arg["w2"], arg["topk_weights"]
    if case.get("pool"):
        w13, w2 = arg["w13_pool"][1::2], arg["w2_pool"][1::2]
    if case.get("transposed"):
        weights = arg["topk_weights_KT"].t()
    want = fused_moe_reference(arg["x"], w13, w2, arg["topk_ids"], weights, arg.get("expert_map"))
    got = out["y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    narrow = max(case["dtype"], case.get("wdtype", case["dtype"]), key=_NARROW.__getitem__)
    atol, rtol = TOLERANCE[narrow]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if case["map"] == "empty":
        assert torch.count_nonzero(got) == 0


@pytest.mark.parametrize("case,message", ERROR_CASES, ids=[c["name"] for c, _ in ERROR_CASES])
def test_triton_ops_reject_bad_input(interpreted, case, message):
    """Bad block sizes, expert ids and map values make the Triton ops raise a message naming them."""
    _, _, errors = interpreted
    assert case["name"] in errors, "the call did not raise"
    assert errors[case["name"]].startswith("ValueError") and message in errors[case["name"]]
