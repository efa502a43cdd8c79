"""`quantkit quantize ... --plan`: the memory plan as a rich table (and JSON), without quantizing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.cli.ui import UI, emit_json
from quantkit.plan import MemoryPlan
from quantkit.sizes import human


def show_plan(ui: UI, plan: MemoryPlan, device: Any, out: Path, json_out: str | None) -> None:
    from rich.table import Table

    from quantkit.memcheck import available, free_disk

    host, dev, where = available(device)
    disk = free_disk(out)
    fits = plan.host <= host and (dev is None or plan.device <= dev) and plan.disk <= disk
    data = {**plan.to_dict(), "available_host_bytes": host, "available_from": where, "free_device_bytes": dev,
            "free_disk_bytes": disk, "fits": fits}
    emit_json(data, json_out)
    if json_out == "-":
        return
    s = plan.settings
    table = Table(title=f"memory plan: {s.method}, {s.nsamples} x {s.seqlen} calibration, "
                        f"offload {'disk' if s.offload else 'none'}, device {s.device}")
    for col, just in (("stage", "left"), ("host RAM", "right"), ("device", "right"), ("temp disk", "right"),
                      ("what dominates", "left")):
        table.add_column(col, justify=just)
    peak = plan.peak.name
    for st in plan.stages:
        name = f"[bold]{st.name}[/]" if st.name == peak else st.name
        table.add_row(name, human(st.host), human(st.device) if st.device else "-",
                      human(st.disk) if st.disk else "-", st.detail)
    ui.out.print(table)
    avail = f"{human(host)} ({where})" + (f", device {human(dev)} free" if dev is not None else "")
    verdict = "[green]fits[/]" if fits else "[red]does not fit[/]: the run would stop before loading"
    ui.out.print(f"peak host RAM {human(plan.host)}, temp disk {human(plan.disk)}; available {avail}, "
                 f"disk {human(disk)} free: {verdict}")
    for note in plan.notes:
        ui.out.print(f"[dim]{note}[/]")
