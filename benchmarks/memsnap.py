"""Where a CUDA step's peak memory goes: replay the caching allocator's trace and group the live blocks at the peak.

``record(step)`` runs ``step`` once under ``torch.cuda.memory._record_memory_history`` (Python frames only) and
returns the snapshot; ``peak_breakdown(snapshot)`` replays its allocation trace (``alloc`` / ``free_completed``
events of device 0), finds the moment the allocated bytes were highest, and groups the blocks live then by the
innermost frame of this project, FLA, mamba-ssm or ``torch/nn`` that made them (else the innermost frame). The
same grouping is given for the bytes already live when the step began (parameters, optimizer state, inputs) so
that the step's own share stands apart. ``benchmarks/models.py --snapshot DIR`` writes one text file per model.
"""

from __future__ import annotations

import collections
import os

# frames of these trees name the code that made a block; torch's own plumbing is skipped when one of them is found
OURS = ("linattn_dsl", "benchmarks", "fla", "mamba_ssm", os.path.join("torch", "nn"))


def _where(frames: list[dict]) -> str:
    for f in frames:  # innermost first
        name = f.get("filename", "")
        if any(f"{os.sep}{tree}{os.sep}" in name or name.startswith(f"{tree}{os.sep}") for tree in OURS):
            short = name.split(os.sep + "site-packages" + os.sep)[-1]
            for tree in OURS:
                i = short.find(os.sep + tree + os.sep)
                if i >= 0:
                    short = short[i + 1:]
                    break
            return f"{short}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?')}:{f.get('line')} {f.get('name')}"
    return "(no frame)"


def peak_breakdown(snapshot: dict, device: int = 0, top: int = 25) -> dict:
    """Replay the trace; ``{'peak': bytes, 'base': bytes, 'at_peak': [(where, bytes, count)], 'base_by': [...],
    'events': n, 'peak_event': i}``. Blocks allocated before recording started count as ``base`` (their sizes
    come from the snapshot's segments where they are still live at the end, else they are unknown)."""
    trace = snapshot["device_traces"][device] if snapshot.get("device_traces") else []
    live: dict[int, tuple[int, str]] = {}
    # blocks live when recording began and never freed during it: the snapshot's active blocks with no alloc event
    allocated_in_trace = {e["addr"] for e in trace if e["action"] == "alloc"}
    base: dict[int, tuple[int, str]] = {}
    for seg in snapshot.get("segments", []):
        if seg.get("device", device) != device:
            continue
        for blk in seg.get("blocks", []):
            if blk.get("state") == "active_allocated" and blk["address"] not in allocated_in_trace:
                base[blk["address"]] = (blk["size"], _where(blk.get("frames", [])) or "(before recording)")
    total = sum(s for s, _ in base.values())
    peak, peak_at, peak_live = total, -1, dict(live)
    for i, e in enumerate(trace):
        act = e["action"]
        if act == "alloc":
            live[e["addr"]] = (e["size"], _where(e.get("frames", [])))
            total += e["size"]
            if total > peak:
                peak, peak_at, peak_live = total, i, None
        elif act == "free_completed" and e["addr"] in live:
            if peak_live is None:
                peak_live = dict(live)  # the set just before the first free after the peak
            total -= live.pop(e["addr"])[0]
    if peak_live is None:
        peak_live = dict(live)

    def group(blocks: dict[int, tuple[int, str]]) -> list[tuple[str, int, int]]:
        by: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for size, where in blocks.values():
            by[where][0] += size
            by[where][1] += 1
        return sorted(((w, b, n) for w, (b, n) in by.items()), key=lambda r: -r[1])[:top]

    return dict(peak=peak, base=sum(s for s, _ in base.values()), at_peak=group(peak_live), base_by=group(base),
                events=len(trace), peak_event=peak_at, live_at_peak=sum(s for s, _ in peak_live.values()))


def record(step, device: int = 0) -> dict:
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def report(b: dict, title: str) -> str:
    gib = 2.0**30
    lines = [f"# {title}", f"peak allocated during the step {b['peak'] / gib:.3f} GiB "
             f"(live before it {b['base'] / gib:.3f} GiB; {b['events']} trace events, peak at event {b['peak_event']})",
             "", f"## live at the peak, by the code that allocated it ({b['live_at_peak'] / gib:.3f} GiB in the step)"]
    lines += [f"{n / gib:9.3f} GiB {c:6d}x  {w}" for w, n, c in b["at_peak"]]
    lines += ["", "## live before the step"]
    lines += [f"{n / gib:9.3f} GiB {c:6d}x  {w}" for w, n, c in b["base_by"]]
    return "\n".join(lines) + "\n"
