"""Helpers shared by the benchmark scripts (run them from the repository root)."""

import zlib

import torch


def derived_seed(seed, *key):
    """A seed for one measurement that depends only on ``seed`` and ``key``, not on run order."""
    return (seed * 1_000_003 + zlib.crc32(repr(key).encode())) % 2**63


def fmt_pm(values, digits=3):
    """``mean ± sd`` of a list of floats (``nan (k of n)`` if any is not finite)."""
    t = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(t).all():
        return f"nan ({int((~torch.isfinite(t)).sum())} of {t.numel()})"
    sd = t.std().item() if t.numel() > 1 else 0.0
    return f"{t.mean().item():.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header, rows):
    """A markdown table; the first three columns left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
