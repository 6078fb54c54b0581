"""Which engines and which training loop a crash campaign runs, derived from the registries:
the checkpointers' ``framework`` (what must be installed) and ``loop_framework`` (the loop
their saves need), the backends' crash loops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from faultlab.backends import load_backend, names as framework_names
from faultlab.checkpointing.api import (COMPARED, checkpointer_class, checkpointer_framework,
                                        checkpointer_names)
from faultlab.crash.loops import LoopSpec, builtin_loops, factory_name, loop_framework
from faultlab.errors import FaultlabError


@dataclass(frozen=True)
class CampaignSetup:
    """What `faultlab crash` runs: the engines, the loop (as named and as a LoopSpec) and the
    framework all the engines need (None: none, or not all the same one)."""

    engines: tuple[str, ...]
    workload: str
    loop: LoopSpec
    framework: str | None


def campaign_setup(engines: Sequence[str] = (), workload: str | None = None, *,
                   steps: int = 24, every: int = 1) -> CampaignSetup:
    """Expand and check `engines` ("all": every compared checkpointer; default "faultlab"),
    check that the frameworks they need are installed and that the loop suits engines whose
    saves come from one framework's adapter (``loop_framework``: faultlab+cow needs a torch
    loop), and choose the loop when none is given: the first crash loop of the framework all
    the engines need, or of the default framework. One-line FaultlabErrors otherwise."""
    known = checkpointer_names()
    chosen: list[str] = []
    for name in engines or ["faultlab"]:
        for n in (COMPARED if name == "all" else [name]):
            if n not in known:
                raise FaultlabError(f"unknown engine {n!r} (one of: {', '.join(known)}, all)")
            if n not in chosen:
                chosen.append(n)
    frameworks = [checkpointer_framework(n) for n in chosen]
    for fw in dict.fromkeys(f for f in frameworks if f is not None):
        load_backend(fw)                        # not installed: the pip hint
    framework = frameworks[0] if len(set(frameworks)) == 1 else None
    loops = builtin_loops()
    if workload is None:
        default_fw = framework or framework_names()[0]
        workload = next(n for n, (fw, _) in loops.items() if fw == default_fw)
    loop_fw = loop_framework(workload)
    for n in chosen:
        need = checkpointer_class(n).loop_framework
        if need is not None and loop_fw is not None and loop_fw != need:
            raise FaultlabError(f"engine {n} needs a {need} loop (its saves come from the "
                                f"{need} adapter); {workload} is a {loop_fw} loop (the {need} "
                                "loops: " + ", ".join(m for m, (fw, _) in loops.items()
                                                      if fw == need) + ")")
    if loop_fw is not None:
        load_backend(loop_fw)
    return CampaignSetup(tuple(chosen), workload,
                         LoopSpec(factory_name(workload), steps, every), framework)
