"""Load jpeft's family artifacts in torch (transformers 5.x + PEFT) and compare outputs with jpeft's.

    python scripts/check_transformers5.py ARTIFACTS_DIR [--atol 1e-5]

ARTIFACTS_DIR is written by ``scripts/make_family_artifacts.py`` (jpeft's side). This script
imports only torch, transformers, peft and numpy, so it runs in a torch user's environment
(``.ci/run`` makes one with the newest transformers 5.x). For every case of ``manifest.json`` it
loads the model folder with ``AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)``
(``AutoModelForSequenceClassification`` for the ``seq_cls`` cases; 5.x defaults to
``dtype="auto"``), attaches the adapter folder, if any, with ``peft.PeftModel.from_pretrained``,
and compares with jpeft's, under both the ``sdpa`` and the ``eager`` attention (only ``eager``
where the case says so: Gemma 2, whose attention soft-cap transformers applies under eager only):

- causal LM cases: the fp32 logits at the real (non-pad) positions of a left-padded batch;
- ``seq_cls`` cases: the ``(batch, num_labels)`` logits of a batch with a right-padded and a
  left-padded row; the ``score`` head must be restored from the adapter (PEFT's ``modules_to_save``);
- ``generate`` cases: ``generate(max_new_tokens=N, do_sample=False, eos_token_id=None,
  pad_token_id=0)`` from the first positions of the inputs must give jpeft's tokens exactly.

Any missing, unexpected or mismatched key (transformers' loading info, PEFT's adapter key check,
or a warning that names such keys or newly initialized weights) fails the case, as does a max abs
diff above ``--atol`` or a different token. Prints one line per case and exits non-zero with one
summary line on any failure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ATTENTION = ("sdpa", "eager")
# a warning or log record that says weights were not loaded as saved: always a failure
KEY_PROBLEM = re.compile(
    r"missing|unexpected|mismatch|newly initiali[sz]ed|not initiali[sz]ed|not used when initiali[sz]ing|"
    r"LOAD REPORT|were not loaded",
    re.IGNORECASE,
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CaseFailure(Exception):
    pass


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def watched(what: str, notes: list[str]) -> Iterator[None]:
    """Runs the body recording Python warnings and transformers/PEFT log warnings; key problems raise."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.messages
    problems = [m for m in messages if KEY_PROBLEM.search(m)]
    if problems:
        text = " | ".join(" ".join(ANSI.sub("", m).split()) for m in problems)
        raise CaseFailure(f"{what}: {text[:1500]}")
    notes.extend(f"{what}: {m.splitlines()[0]}" for m in dict.fromkeys(messages))


def load_model(folder: Path, attention: str, notes: list[str], head: str = "causal") -> Any:
    import torch
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    if head == "seq_cls":
        auto = transformers.AutoModelForSequenceClassification
    with watched(f"from_pretrained({folder.name})", notes):
        model, info = auto.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=attention, output_loading_info=True
        )
    bad = {name: sorted(map(str, keys)) for name, keys in info.items() if keys}
    if bad:
        raise CaseFailure(f"from_pretrained({folder}): {bad}")
    params = {p.dtype for p in model.parameters()}
    if params != {torch.float32}:
        raise CaseFailure(f"from_pretrained({folder}): parameters in {params}, not float32")
    return model.eval()


def attach_adapter(model: Any, folder: Path, notes: list[str]) -> Any:
    import peft

    kwargs: dict[str, Any] = {}
    if "strict_adapter_check" in inspect.signature(peft.PeftModel.from_pretrained).parameters:
        kwargs["strict_adapter_check"] = "error"  # missing or unexpected adapter keys raise
    with watched(f"PeftModel.from_pretrained({folder.name})", notes):
        try:
            peft_model = peft.PeftModel.from_pretrained(model, folder, **kwargs)
        except RuntimeError as err:
            raise CaseFailure(f"PeftModel.from_pretrained({folder}): {err}") from err
    return peft_model.eval()


def check_score_restored(model: Any, folder: Path) -> None:
    """A SEQ_CLS adapter's ``score`` must be PEFT's trained copy (``modules_to_save``), equal to the saved one."""
    import peft
    import torch
    from safetensors.torch import load_file

    score: Any = model.base_model.model.score
    if not isinstance(score, peft.utils.other.ModulesToSaveWrapper) or "default" not in score.modules_to_save:
        raise CaseFailure(f"PeftModel.from_pretrained({folder}): `score` is a {type(score).__name__}, not PEFT's "
                          "modules_to_save copy")
    saved = load_file(folder / "adapter_model.safetensors")["base_model.model.score.weight"]
    active: Any = score.modules_to_save["default"].weight
    if not torch.equal(active, saved) or torch.equal(active, score.original_module.weight):
        raise CaseFailure(f"PeftModel.from_pretrained({folder}): the active `score` is not the adapter's")


def torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.logits.float().numpy()


def max_real_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    """Max abs diff over the real positions of the last ``mask.shape[1]`` tokens (a fully masked row is undefined)."""
    length = mask.shape[1]
    if got.shape != want.shape:
        raise CaseFailure(f"logits shape {got.shape}, jpeft's {want.shape}")
    real = mask.astype(bool)[..., None]
    return float(np.abs(np.where(real, got[:, -length:] - want[:, -length:], 0.0)).max())


def check_case(root: Path, case: dict[str, Any], ids: np.ndarray, mask: np.ndarray, atol: float,
               notes: list[str]) -> dict[str, float]:
    """The case's max abs diff per attention (0 for an identical generation); raises :class:`CaseFailure`."""
    if "ids" in case:
        ids = np.load(root / case["ids"], allow_pickle=False)
        mask = np.load(root / case["mask"], allow_pickle=False)
    head = case.get("head", "causal")
    diffs = {}
    for attention in case.get("attention", ATTENTION):
        model = load_model(root / case["model"], attention, notes, head)
        if "adapter" in case:
            model = attach_adapter(model, root / case["adapter"], notes)
            if head == "seq_cls":
                check_score_restored(model, root / case["adapter"])
        if case.get("kind") == "generate":
            diffs[attention] = check_generate(root, case, model, ids, mask, attention)
            continue
        want = np.load(root / case["logits"], allow_pickle=False)
        got = torch_logits(model, ids, mask)
        if head == "seq_cls":
            if got.shape != want.shape:
                raise CaseFailure(f"logits shape {got.shape}, jpeft's {want.shape}")
            diff = float(np.abs(got - want).max())
        else:
            diff = max_real_diff(got, want, mask)
        diffs[attention] = diff
        if not diff <= atol:
            raise CaseFailure(f"{attention} attention: max abs logit diff {diff:.3e} > {atol:g}")
    return diffs


def check_generate(root: Path, case: dict[str, Any], model: Any, ids: np.ndarray, mask: np.ndarray,
                   attention: str) -> float:
    """transformers' greedy ``generate`` from the case's prompt must give jpeft's tokens exactly."""
    import torch

    want = np.load(root / case["tokens"], allow_pickle=False)
    prompt = int(case["prompt"])
    with torch.no_grad():
        got = model.generate(
            input_ids=torch.from_numpy(ids[:, :prompt]).long(),
            attention_mask=torch.from_numpy(mask[:, :prompt]).long(),
            max_new_tokens=int(case["max_new_tokens"]),
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
    if got.shape != want.shape or not np.array_equal(got, want):
        raise CaseFailure(f"{attention} attention: greedy tokens differ from jpeft's\n  torch {got.tolist()}\n"
                          f"  jpeft {want.tolist()}")
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: no Hub look-up may hang or pass
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    if int(transformers.__version__.split(".")[0]) < 5:
        print(f"FAIL: transformers {transformers.__version__} is not 5.x", file=sys.stderr)
        return 1
    root = args.artifacts
    manifest = json.loads((root / "manifest.json").read_text())
    ids = np.load(root / manifest["ids"], allow_pickle=False)
    mask = np.load(root / manifest["mask"], allow_pickle=False)
    failed: list[str] = []
    notes: list[str] = []
    worst: dict[str, float] = {}
    for case in manifest["cases"]:
        family = case["name"].split("/")[0]
        try:
            diffs = check_case(root, case, ids, mask, args.atol, notes)
        except CaseFailure as err:
            failed.append(case["name"])
            print(f"{case['name']:33s} FAIL {err}", flush=True)
            continue
        if case.get("kind") == "generate":
            print(f"{case['name']:33s} ok   greedy tokens identical: {', '.join(diffs)}", flush=True)
            continue
        worst[family] = max(worst.get(family, 0.0), *diffs.values())
        figures = ", ".join(f"{a} {d:.2e}" for a, d in diffs.items())
        print(f"{case['name']:33s} ok   max abs diff: {figures}", flush=True)
    for note in dict.fromkeys(notes):
        print(f"note (a warning, not about keys): {note}")
    print("per family, max abs logit diff of the passing cases: "
          + ", ".join(f"{family} {diff:.2e}" for family, diff in worst.items()))
    total = len(manifest["cases"])
    print(f"transformers5: {total - len(failed)} passed, {len(failed)} failed", flush=True)
    if failed:
        print(f"FAIL: {len(failed)} of {total} jpeft exports do not load with equal logits (or greedy tokens) "
              f"under transformers {transformers.__version__} / peft {peft.__version__}: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
