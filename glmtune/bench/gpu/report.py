"""gpu_check.md: the GPU check's results as the tables that go into docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

GiB = 2 ** 30


def _gib(value: Any) -> str:
    return f"{value / GiB:.2f} GiB" if isinstance(value, (int, float)) and value else "-"


def _status(item: dict[str, Any]) -> str:
    if item.get("ok") is None:
        return "skipped: " + str(item.get("skipped", ""))
    return "ok" if item.get("ok") else "FAILED" + (f": {item['error']}" if item.get("error") else "")


def _number(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}g}"


def render(results: dict[str, Any]) -> str:
    machine, versions = results["machine"], results["versions"]
    lines = ["# glmtune GPU check" + (" (--tiny)" if results.get("tiny") else ""), "",
             f"- command: `{results['command']}`",
             f"- commit: {results.get('commit') or 'unknown'}; started {results.get('started')}"
             + (f"; wall time {results['wall_s']:.0f} s" if "wall_s" in results else ""),
             f"- machine: {machine.get('gpu') or 'no GPU'}"
             + (f" ({machine['gpu_memory_bytes'] / GiB:.0f} GiB, CUDA {machine.get('cuda')})"
                if machine.get("gpu_memory_bytes") else "")
             + f", CPU {machine.get('cpu')} x{machine.get('cpu_count')}, Python {machine.get('python')}",
             "- versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()), "",
             "| section | status | seconds | budget (s) |", "| --- | --- | ---: | ---: |"]
    sections = results["sections"]
    for name, section in sections.items():
        status = section["status"] + (f" ({section['error']})" if section.get("error") else "")
        lines.append(f"| {name} | {status[:300]} | {section.get('seconds', '-')} | {section.get('budget_s', '-')} |")
    lines += _correctness(sections.get("correctness", {}).get("items", []))
    lines += _training(sections.get("training", {}).get("items", []))
    lines += _serving(sections.get("serving", {}).get("items", []))
    lines += _estimate(sections.get("estimate", {}).get("items", []))
    return "\n".join(lines) + "\n"


def _correctness(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    lines = ["", "## 1. Correctness on the device", "", "| check | value | tolerance | result |",
             "| --- | ---: | ---: | --- |"]
    for item in items:
        extra = f" (top-1 agreement {item['top1_agreement']:.0%})" if "top1_agreement" in item else ""
        lines.append(f"| {item['name']} | {_number(item.get('value'))}{extra} | {_number(item.get('tolerance', '-'))} "
                     f"| {_status(item)} |")
    return lines


def _training(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    lines = ["", "## 2. Full-size training, random weights", "",
             "| case | recipe | dtype | largest batch | peak memory | published | target | real tok/s | padding "
             "| MFU | result |", "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    peak = next((i for i in items if i.get("name") == "matmul peak"), None)
    loops = []
    for item in items:
        if item.get("name") == "matmul peak":
            continue
        if item.get("recipe") == "glmtune train":
            loops.append(item)
            continue
        batch = item.get("largest_batch") or {}
        shape = f"{batch['rows']} x {batch['length']}" if batch else "-"
        lines.append(
            f"| {item.get('title', item['name'])} | {item.get('recipe', item['name'].split()[-1])} "
            f"| {item.get('dtype', '-')} "
            f"| {shape} | {_gib(item.get('peak_memory_bytes'))} | {item.get('official') or '-'} "
            f"| {_gib(item.get('target_bytes'))} | {_number(item.get('real_tokens_per_s', '-'), 4)} "
            f"| {_percent(item.get('padding_share'))} | {_percent(item.get('mfu'))} | {_status(item)[:200]} |")
    if peak:
        lines.append(f"\nMFU against the {peak.get('dtype')} matmul peak measured in the same run: "
                     f"{peak['value'] / 1e12:.1f} TFLOP/s.")
    ratios = _ratios(items)
    if ratios:
        lines += ["", "| case | glmtune / tutorial real tok/s | glmtune / tutorial peak memory |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {case} | x{speed:.2f} | x{memory:.2f} |" for case, speed, memory in ratios]
    for item in loops:
        lines += ["", f"{item.get('title', item['name'])}: {item.get('steps')} steps, "
                      f"{item.get('losses_logged')} losses logged, first {_number(item.get('first_loss'))}, last "
                      f"{_number(item.get('last_loss'))}, non-finite losses {item.get('nonfinite_losses')}, steps "
                      f"skipped by the scaler/guard {item.get('steps_skipped')}, loss scaler "
                      f"{'on' if item.get('loss_scaler') else 'off'}: {_status(item)}"]
    return lines


def _ratios(items: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    found = []
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for item in items:
        if item.get("case") and item.get("recipe") in ("glmtune", "tutorial") and item.get("ok"):
            by_case.setdefault(item["case"], {})[item["recipe"]] = item
    for case, recipes in by_case.items():
        if "glmtune" in recipes and "tutorial" in recipes:
            ours, theirs = recipes["glmtune"], recipes["tutorial"]
            found.append((case, ours["real_tokens_per_s"] / theirs["real_tokens_per_s"],
                          ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]))
    return found


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _serving(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    lines = ["", "## 3. Serving (glmtune serve, random-weight ChatGLM3-6B)", "",
             "| load | requests | max_tokens | completion tok/s | p50 s | p90 s | p99 s | result |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for item in items:
        if "latency_s" not in item:
            lines.append(f"| {item['name']} | | | {_number(item.get('value'))} | | | | {_status(item)} |")
            continue
        latency = item["latency_s"]
        lines.append(f"| {item['name']} | {item['requests']} | {item['max_tokens']} "
                     f"| {item['completion_tokens_per_s']} "
                     f"| {latency['p50']} | {latency['p90']} | {latency['p99']} | {_status(item)} |")
    return lines


def _estimate(items: list[dict[str, Any]]) -> list[str]:
    if not items:
        return []
    lines = ["", "## 4. Memory estimate against the measured peak", "",
             "| run | measured | estimate | error | result |", "| --- | ---: | ---: | ---: | --- |"]
    for item in items:
        if "dry_run_bytes" in item:
            lines.append(f"| {item['name']} (worst batch of the data) | {_gib(item.get('measured_bytes'))} "
                         f"| {_gib(item['dry_run_bytes'])} | - | {_status(item)} |")
        else:
            error = item.get("error")
            lines.append(f"| {item['name']} | {_gib(item.get('measured_bytes'))} | {_gib(item.get('estimate_bytes'))} "
                         f"| {_percent(error) if isinstance(error, float) else '-'} | {_status(item)[:200]} |")
    return lines
