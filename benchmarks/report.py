"""Results out: a table on stdout, JSON, a PNG, and a Markdown section."""

import datetime
import json
import os
import platform
import subprocess

COLUMNS = (
    ("fs", "fs"),
    ("operation", "operation"),
    ("image", "image"),
    ("extents", "extents"),
    ("median_ms", "median ms"),
    ("p90_ms", "p90 ms"),
    ("floor_ms", "thread floor ms"),
    ("x_floor", "x thread floor"),
    ("bare_floor_ms", "bare floor ms"),
    ("clone_ms", "clone ms"),
    ("verdict", "target"),
)

#: The rows of the spares-at-scale scenario have a table of their own.
SPARES_COLUMNS = (
    ("fs", "fs"),
    ("operation", "operation"),
    ("extents", "extents"),
    ("median_ms", "median ms"),
    ("p90_ms", "p90 ms"),
    ("n", "n"),
    ("per_item_ms", "per spare/VM ms"),
    ("x_no_spares", "x no spares"),
)
SPARES = "spares@scale"


def split(rows):
    """(the rows of the main table, those of the spares-at-scale one)."""
    main = [r for r in rows if r.get("scenario") != SPARES]
    return main, [r for r in rows if r.get("scenario") == SPARES]


def _first_line(*cmd):
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def loadavg():
    """The load averages (1, 5, 15 min) of the machine now."""
    with open("/proc/loadavg", encoding="ascii") as info:
        return " ".join(info.read().split()[:3])


def machine():
    """What the numbers were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as info:
        mem_kib = int(info.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "btrfs_progs": _first_line("mkfs.btrfs", "--version"),
        "xfsprogs": _first_line("mkfs.xfs", "-V"),
        "coreutils": _first_line("cp", "--version"),
        "loadavg_end": loadavg(),
    }


def verdict(result):
    """The target cell: the ratio the target is about, and pass/FAIL."""
    if "target" not in result:
        return ""
    mark = "pass" if result["pass"] else "FAIL"
    if "got" in result:  # the scenario says what its target is about
        got = result["got"]
    elif "x_two_clones" in result:
        got = f"{result['x_two_clones']:.3f} x two clones (<= 0.6)"
    elif "x_cp" in result:
        got = f"{result['x_cp']:.2f} x cp (<= 1)"
    elif result["operation"].startswith("event loop"):
        got = f"max {result['max_ms']:.2f} ms (< 20)"
    else:
        got = f"{result['x_floor']:.2f} x thread floor (<= 1.5)"
    return f"{got} {mark}"


def _cells(result, columns):
    cells = []
    for key, _title in columns:
        if key == "verdict":
            value = verdict(result)
        elif key == "n":
            value = result.get("extra_reflinks") or result.get(
                "stopped_appvms", ""
            )
        else:
            value = result.get(key, "")
        if isinstance(value, float):
            value = f"{value:.3f}" if value < 10 else f"{value:.1f}"
        cells.append(str(value))
    return cells


def text_table(rows, columns=COLUMNS):
    """The results as a fixed-width table."""
    lines = [[title for _key, title in columns]]
    lines += [_cells(result, columns) for result in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for index, line in enumerate(lines):
        out.append(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths))
        )
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def text_tables(rows):
    """The main table and, if there are such rows, the spares one."""
    main, spares = split(rows)
    tables = [text_table(main)] if main else []
    if spares:
        tables.append(text_table(spares, SPARES_COLUMNS))
    return "\n\n".join(tables)


def markdown_table(rows, columns=COLUMNS):
    """The results as a Markdown table."""
    out = [
        "| " + " | ".join(title for _key, title in columns) + " |",
        "|" + "|".join("---" for _column in columns) + "|",
    ]
    for result in rows:
        out.append("| " + " | ".join(_cells(result, columns)) + " |")
    return "\n".join(out)


def _write_atomically(path, write):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, document):
    """The whole run as JSON."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=1, sort_keys=True)
            out.write("\n")

    _write_atomically(path, write)


def draw(path, curves):
    """Latency against extent count per filesystem: driver start and
    stop, the thread and bare floors, one plain clone and two clones."""
    # pylint: disable=import-outside-toplevel
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = sorted(curves)
    figure, axes = pyplot.subplots(
        1, len(names), figsize=(6 * len(names), 4.8), squeeze=False
    )
    lines = (
        ("start_ms", "driver: start", "o-", "tab:green"),
        ("stop_ms", "driver: stop", "s-", "tab:blue"),
        (
            "floor_ms",
            "thread floor: rename + dir fsync via to_thread",
            "--",
            "black",
        ),
        ("bare_floor_ms", "bare floor: rename + dir fsync", ":", "grey"),
        ("clone_ms", "plain clone (FICLONE)", "^-", "tab:red"),
        ("two_clones_ms", "two clones", "v:", "tab:orange"),
    )
    for axis, name in zip(axes[0], names):
        points = sorted(curves[name], key=lambda point: point["extents"])
        extents = [max(1, point["extents"]) for point in points]
        for key, label, style, colour in lines:
            axis.plot(
                extents,
                [point[key] for point in points],
                style,
                label=label,
                color=colour,
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("extents of the image")
        axis.set_ylabel("latency, ms (median)")
        axis.set_title(f"{name}: 1 GiB images (and 64 GiB sparse)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    _write_atomically(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=100)
    )
    pyplot.close(figure)


def draw_boot_storms(path, storms):
    """Time until all have started against the number of AppVMs started
    together, per filesystem and way of starting (subvolume, clone)."""
    # pylint: disable=import-outside-toplevel
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4.8))
    styles = {"subvolume": "o-", "clone": "s--"}
    for fstype in sorted(storms):
        for mechanism, points in sorted(storms[fstype].items()):
            axis.plot(
                [point["vms"] for point in points],
                [point["total_ms"] for point in points],
                styles[mechanism],
                label=f"{fstype}, {mechanism}",
            )
    axis.set_yscale("log")
    axis.set_xlabel("AppVMs of one template started together")
    axis.set_ylabel("until all have started, ms (median, log scale)")
    axis.set_title("Boot storm: 1 GiB template root, fragmented")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    _write_atomically(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=100)
    )
    pyplot.close(figure)


def markdown(document, picture):
    """The README-ready section: date, machine, tables, picture (None:
    no picture, the origin scenario did not run)."""
    info = document["machine"]
    main, spares = split(document["results"])
    lines = [
        "## Benchmarks",
        "",
        f"Measured {document['date']} with `make bench` "
        f"({document['duration_s']:.0f} s) on {info['nproc']} CPUs "
        f"({info['cpu']}), {info['memory_gib']} GiB RAM, Linux "
        f"{info['kernel']}, Python {info['python']}; btrfs "
        f"({info['btrfs_progs']}) and XFS ({info['xfsprogs']}) on loop "
        "devices over sparse files, made for the run. "
        f"Load average {info['loadavg_start']} at the start, "
        f"{info['loadavg_end']} at the end (other work on the machine "
        "shows as noise). "
        f"{document['reps']} repetitions per line (the {document['vms']}-VM "
        f"run: {document['vm_reps']}); median and p90 in ms. *thread floor*: "
        "a rename + directory fsync beside the image run through "
        "`asyncio.to_thread`, as the driver runs its file work, measured in "
        "the same run (start target: median <= 1.5 x it); *bare floor*: the "
        "same rename + fsync without the thread hand-off; *clone*: a plain "
        "FICLONE of the same image.",
        "",
    ]
    if main:
        lines += [markdown_table(main), ""]
    if spares:
        lines += [
            "Spares at scale: a template root of "
            f"{spares[0]['extents']} extents and up to {document['vms']} "
            "AppVMs whose root is a snapshot of it; "
            f"{document.get('spares_reps', '')} repetitions per line "
            "(making and deleting legacy spares, AppVM starts and stops: "
            "one). *n*: extra reflinks of the template root (legacy spares, "
            "one per stopped AppVM in the old design) or AppVMs of the "
            "current driver; *x no spares*: the median against the same "
            "operation with no extra reflink (for making and deleting "
            "legacy spares: the time per spare against one clone, one "
            "deletion).",
            "",
            markdown_table(spares, SPARES_COLUMNS),
            "",
        ]
    if picture:
        lines += [f"![latency against extent count]({picture})", ""]
    if document.get("boot_storms"):
        lines += [
            "![boot storm: time until all have started against the number "
            "of AppVMs](benchmarks/results/bootstorm.png)",
            "",
        ]
    return "\n".join(lines)


def write_markdown(path, text):
    """Write the Markdown section to `path`."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)

    _write_atomically(path, write)


def now():
    """The date of the run, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"
    )
