"""What the studio's buttons do, apart from Gradio so tests can call them: each takes the page's values and
the language, and returns text for the page. A user's mistake becomes one readable message (GlmtuneError),
never a traceback.

Nothing a user types runs code or writes outside the runs folder and the export folder they name: a run's
name is one plain folder name inside the runs folder (glmtune/studio/runs.py), the form's values become the
flags of a `glmtune train` command run without a shell, config YAML is read with glmtune's safe loader, and
every text from a file or a model is escaped before it is shown as HTML.
"""

from __future__ import annotations

import html
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from glmtune.config import DEFAULT_MODEL
from glmtune.errors import ERROR_PREFIX, GlmtuneError
from glmtune.studio import form
from glmtune.studio.presets import PRESETS, USER_OWNED
from glmtune.studio.runs import RunManager, check_run_name
from glmtune.studio.texts import text

log = logging.getLogger(__name__)

STUDIO_FOLDER = ".studio"  # inside the runs folder: saved YAML and Gradio's uploads
LENGTH_COLUMNS = ("mean", "median", "p95", "p99", "max")  # of `glmtune data stats --json`


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def human_size(count: int) -> str:
    """A parameter count as people write it: 134.52M, 6.24B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}".replace(".00", "")
    return str(count)


class Studio:
    """The state behind the page: the runs folder, its run manager and the chat models loaded for Results."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.runs = RunManager(self.runs_dir)
        self.fields = form.option_fields()
        self.engine = None  # the ChatEngine serving "base" and "tuned" for the Results tab
        self._engine_lock = threading.Lock()

    # -- options -----------------------------------------------------------------------------------------

    def options(self, values: dict[str, Any]) -> dict[str, Any]:
        """The options the form sets, checked as `glmtune train` checks them, with the values the config holds
        (3, not the "3" a text box gave)."""
        options = form.given_options(values, self.fields)
        config = form.config_of(options)
        return {key: getattr(config, key) for key in options}

    def command(self, values: dict[str, Any], name: str = "", lang: str = "en") -> tuple[str, str]:
        """(the equivalent `glmtune train` command, the options as YAML)."""
        import shlex

        options = self.options(values)
        words = form.command_words(form.config_of(options))
        folder = self.runs.runs_dir / (_run_name(name, lang) if name.strip() else "NAME")
        return shlex.join(["glmtune", "train", *words, "--output-dir", str(folder)]), form.yaml_text(options)

    def load_yaml(self, source: str, text_value: str) -> tuple[dict[str, Any], list[str]]:
        """(form values from a config's text, the options in it that the studio sets itself and so ignored:
        output_dir, overwrite, resume). Tutorials' option names are read as glmtune's, values checked."""
        from glmtune.config import parse_config_text

        raw = parse_config_text(text_value or "", source)
        config = form.config_of(raw)
        given = {name: getattr(config, name) for name in _given_names(config)}
        ignored = [name for name in given if name in form.RUN_OWNED]
        return form.form_values({k: v for k, v in given.items() if k not in ignored}, self.fields), ignored

    def preset(self, name: str, values: dict[str, Any]) -> dict[str, Any]:
        """Form values for a preset: its options over glmtune's defaults, the user's model and data kept."""
        options = dict(PRESETS[name][3])
        kept = {key: values[key] for key in USER_OWNED if key in values}
        fresh = form.form_values(options, self.fields)
        return {**fresh, **kept}

    def save_yaml(self, values: dict[str, Any]) -> Path:
        """The options as a YAML file in RUNS/.studio/configs (the page offers it as a download)."""
        options = self.options(values)
        folder = self.runs_dir / STUDIO_FOLDER / "configs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        path.write_text(form.yaml_text(options), encoding="utf-8")
        return path

    # -- model and data ----------------------------------------------------------------------------------

    def describe_model(self, name: str, lang: str) -> tuple[str, list[list[str]]]:
        from glmtune.studio.inspect_model import describe_model

        facts = describe_model((name or "").strip() or DEFAULT_MODEL)
        stored = text("stored_quantized", lang, bits=facts.stored_quantization) if facts.stored_quantization else ""
        summary = text("model_facts", lang, name=html.escape(facts.name), family=facts.family,
                       size=human_size(facts.parameters), context=facts.context_length or text("unknown", lang),
                       template=facts.template, stored=stored)
        assumed = ", ".join(f"{k} {v}" for k, v in (facts.assumed or {}).items() if k in ("batch_size", "seq_len", "dtype"))
        summary += "\n\n" + text("fits_intro", lang, device=facts.device, gib=_number(facts.memory_available_gib, 1),
                                 source=text(f"memory_{facts.memory_source}", lang), assumed=assumed)
        rows = []
        for fit in facts.fits:
            bits = text("full_weights", lang) if not fit.quantization_bit else f"{fit.quantization_bit}-bit {fit.backend}"
            verdict = "—" if fit.fits is None else text("yes" if fit.fits else "no", lang)
            if fit.problem:  # the page's words for why; the detail (the library's one line) after them
                verdict += f" ({text('fit_' + fit.problem, lang)}" + (f": {fit.reason})" if fit.reason else ")")
            rows.append([fit.method, bits, _number(fit.estimated_gib, 1), verdict])
        return summary, rows

    def inspect_data(self, values: dict[str, Any], lang: str) -> tuple[str, list[list[Any]], str, str]:
        """(summary, length table, what each set of limits would cut, preview HTML) of the training data, as the
        form's options would read it."""
        from glmtune.data.preprocess import LengthLimits
        from glmtune.studio.inspect_data import inspect_data, preview_html

        from glmtune.data.mixing import train_paths

        config = form.config_of(self.options(values))
        if not config.train_file:
            raise GlmtuneError(text("no_train_file", lang))
        path = train_paths(config.train_file)[0]  # of a mix, the first file
        limits = LengthLimits(config.max_source_length, config.max_target_length, config.cutoff_len)
        facts = inspect_data(path, config.model, template=config.template, limits=limits,
                             prompt_column=config.prompt_column, response_column=config.response_column,
                             prompt_template=config.prompt_template, train_on=config.train_on)
        tools = text("data_tools", lang, calls=facts.tool_calls) if facts.tool_calls else ""
        summary = text("data_facts", lang, path=html.escape(str(facts.path)), format=facts.format,
                       samples=facts.samples, answers=facts.trained_answers, tools=tools)
        stats = facts.stats
        summary += "\n\n" + text("data_lengths", lang, model=html.escape(config.model), template=facts.template)
        rows = []
        for part in ("prompt", "answer", "total"):
            numbers = stats.get(part) or {}
            rows.append([part] + [_number(numbers.get(k), 1) for k in LENGTH_COLUMNS])
        cuts = stats.get("cut_at") or {}
        cut_text = (text("data_cut", lang) + "\n" + "\n".join(
            f"- {html.escape(limits_text)}: {count}" for limits_text, count in cuts.items())) if cuts else ""
        return summary, rows, cut_text, text("preview_intro", lang) + preview_html(
            facts.preview, heading=text("preview_line", lang), cut_note=text("preview_cut", lang))

    # -- runs --------------------------------------------------------------------------------------------

    def start(self, values: dict[str, Any], name: str, lang: str = "en") -> str:
        options = self.options(values)
        words = form.command_words(form.config_of(options))
        name = _run_name(name, lang) if name and name.strip() else f"studio-{time.strftime('%Y%m%d-%H%M%S')}"
        self.runs.start(name, words)
        return name

    def run_rows(self, lang: str) -> list[list[Any]]:
        return [[r.name, text(f"status_{r.status}", lang), r.step if r.max_steps is None else f"{r.step}/{r.max_steps}",
                 r.method or "", r.model or ""] for r in self.runs.runs()]

    def progress(self, name: str, lang: str) -> str:
        if not name:
            return ""
        info = self.runs.info(name)
        summary = text("progress", lang, name=html.escape(info.name), status=text(f"status_{info.status}", lang),
                       step=info.step, total=info.max_steps if info.max_steps is not None else "?")
        if info.status == "failed" and info.error:
            summary += "\n\n" + text("error", lang, message=html.escape(info.error))
        return summary

    def curves(self, name: str):
        """The run's training and eval loss against the step as a matplotlib Figure (None before the first loss)."""
        from glmtune.train.plot import loss_figure

        return loss_figure(self.runs.curves(name), "", labels=("loss", "eval_loss")) if name else None

    # -- results -----------------------------------------------------------------------------------------

    def results(self, name: str, lang: str) -> tuple[str, str]:
        """(the run's metrics in one paragraph, its before/after report as Markdown or "")."""
        import json

        if not name:
            return text("no_run", lang), ""
        info = self.runs.info(name)
        metrics_file = info.folder / "metrics.json"
        if not metrics_file.is_file():
            return text("no_metrics", lang, name=html.escape(name)), ""
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        train, evaluated = metrics.get("train") or {}, metrics.get("eval") or {}
        summary = text("metrics", lang, name=html.escape(name), steps=metrics.get("global_step"),
                       loss=_number(train.get("train_loss")), eval=_number(evaluated.get("eval_loss")),
                       initial=_number(metrics.get("initial_eval_loss")), best=_number(metrics.get("best_eval_loss")),
                       params=f"{metrics.get('trainable_parameters', 0):,}")
        reports = [p for p in (info.folder / "report.md", info.folder / "compare" / "report.md") if p.is_file()]
        report = max(reports, key=lambda p: p.stat().st_mtime, default=None)  # eval_generate's, or a later compare
        return summary, (report.read_text(encoding="utf-8") if report else "")

    def make_report(self, name: str, lang: str) -> str:
        """Runs `glmtune compare` for the run's adapter on its dev_file, into RUN/compare; returns its output."""
        info = self._finished(name, lang)
        config = self._resolved(info)
        if not config.get("dev_file"):
            raise GlmtuneError(text("report_needs_dev", lang))
        words = ["compare", "--adapter", str(info.adapter), "--data", str(config["dev_file"]),
                 "--output", str(info.folder / "compare"), "--overwrite"]
        if config.get("max_eval_samples"):
            words += ["--max-samples", str(config["max_eval_samples"])]
        return self._glmtune(words)

    def export(self, name: str, merge: bool, folder: str, lang: str) -> str:
        info = self._finished(name, lang)
        if not folder or not folder.strip():
            raise GlmtuneError(text("export_folder", lang) + "?")
        words = ["export", "--adapter", str(info.adapter), "--output", folder.strip()] + (["--merge"] if merge else [])
        return self._glmtune(words)

    def load_chat(self, name: str, lang: str) -> str:
        """Loads the run's base model once with two served names: `base`, and `tuned` (its adapter)."""
        from glmtune.inference.adapters import load_served_models
        from glmtune.serve.engine import ChatEngine

        info = self._finished(name, lang)
        with self._engine_lock:
            self.close_chat()
            models = load_served_models(None, [("tuned", str(info.adapter))])
            self.engine = ChatEngine(models=models, max_batch=4)
        return text("chat_loaded", lang, model=html.escape(str(self._resolved(info).get("model"))),
                    run=html.escape(name))

    def chat(self, question: str, base_turns: list[tuple[str, str]], tuned_turns: list[tuple[str, str]], lang: str,
             max_new_tokens: int = 256):
        """Yields (base answer, tuned answer) as both grow, each model answering its own conversation so far
        (`*_turns`: (role, text) pairs); the two are generated together in one batch."""
        from glmtune.config import GenerationOptions
        from glmtune.data.formats import Message
        from glmtune.serve.engine import ChatRequest, Failed

        engine = self.engine
        if engine is None:
            raise GlmtuneError(text("chat_not_loaded", lang))
        answers = {"base": "", "tuned": ""}
        done = {"base": threading.Event(), "tuned": threading.Event()}
        changed = threading.Event()

        earlier = {"base": base_turns, "tuned": tuned_turns}

        def answer(model: str) -> None:
            messages = [Message(role, content) for role, content in earlier[model]] + [Message("user", question)]
            request = ChatRequest(messages, GenerationOptions(max_new_tokens=max_new_tokens), model=model)
            try:
                for event in engine.stream(request):
                    if isinstance(event, str):
                        answers[model] += event
                    elif isinstance(event, Failed):
                        answers[model] += "\n" + text("error", lang, message=event.message)
                    changed.set()
            except GlmtuneError as e:
                answers[model] = text("error", lang, message=str(e))
            finally:
                done[model].set()
                changed.set()

        for model in answers:
            threading.Thread(target=answer, args=(model,), daemon=True).start()
        while not all(event.is_set() for event in done.values()):
            changed.wait(0.5)
            changed.clear()
            yield answers["base"], answers["tuned"]
        yield answers["base"], answers["tuned"]

    def close_chat(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # -- helpers -----------------------------------------------------------------------------------------

    def _finished(self, name: str, lang: str):
        if not name:
            raise GlmtuneError(text("no_run", lang))
        info = self.runs.info(name)
        if info.adapter is None:
            raise GlmtuneError(text("no_adapter", lang, name=name))
        return info

    @staticmethod
    def _resolved(info) -> dict[str, Any]:
        from glmtune.config import read_config_file

        path = info.folder / "resolved_config.yaml"
        return dict(read_config_file(path)) if path.is_file() else {}

    @staticmethod
    def _glmtune(words: list[str]) -> str:
        """Runs `glmtune WORDS` (no shell) and returns its output; its one-line error as a GlmtuneError."""
        done = subprocess.run([sys.executable, "-m", "glmtune", *words], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line.removeprefix(ERROR_PREFIX) for line in done.stderr.splitlines()
                      if line.startswith(ERROR_PREFIX)]
            raise GlmtuneError("\n".join(errors) or (done.stderr.strip().splitlines() or ["failed"])[-1])
        return done.stdout.strip()


def _run_name(name: str, lang: str) -> str:
    """The run's name as typed (stripped), if it is one plain folder name; else why not, in `lang`."""
    try:
        return check_run_name(name.strip())
    except GlmtuneError:
        raise GlmtuneError(text("bad_run_name", lang, name=name.strip()[:60] or "''")) from None


def _given_names(config) -> list[str]:
    """The options of `config` that differ from their defaults."""
    from dataclasses import fields

    return [f.name for f in fields(config) if getattr(config, f.name) != f.default]
