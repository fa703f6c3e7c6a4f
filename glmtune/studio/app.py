"""`glmtune studio`: the Gradio page over glmtune/studio/actions.py.

Five tabs in the order of the work (model, data, options, runs, results). Every label, hint and message
comes from glmtune/studio/texts.py or, for the options, from glmtune/config.py, in the language of the
switch at the top; the browser remembers the choice (localStorage). Runs are processes of their own
(glmtune/studio/runs.py): the page only reads their folders, every two seconds while it is open.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glmtune.errors import GlmtuneError
from glmtune.serve.gradio_page import serve_page
from glmtune.studio import form
from glmtune.studio.actions import LENGTH_COLUMNS, STUDIO_FOLDER, Studio
from glmtune.studio.presets import USER_OWNED, preset_choices
from glmtune.studio.texts import LANGUAGES, text

SECTIONS = ("model", "data", "method", "training")
IN_OWN_TAB = ("model", "train_file", "dev_file")  # shown in the Model and Data tabs rather than with the options
CSS = """
.glmtune-preview { white-space: pre-wrap; font-family: monospace; font-size: 0.9em; }
.glmtune-preview mark.trained { background: #fde68a; }
"""
REFRESH_SECONDS = 2.0
log = logging.getLogger(__name__)


def _error(e: Exception, lang: str) -> str:
    """One readable message in the page: a user's mistake (GlmtuneError) as glmtune words it; anything else
    (a bug) named as unexpected, with its traceback in the studio's output."""
    message = str(e) if isinstance(e, GlmtuneError) else text("unexpected", lang, message=f"{type(e).__name__}: {e}")
    if not isinstance(e, GlmtuneError):
        log.error("studio: %s", message, exc_info=e)
    return text("error", lang, message=html.escape(message).replace("\n", "  \n"))


class Labels:
    """The components whose words depend on the language, with how to word each attribute."""

    def __init__(self):
        self.items: list[tuple[Any, dict[str, Callable[[str], Any]]]] = []

    def add(self, component, **attributes):
        """attributes: a texts.py key, or a function of the language."""
        self.items.append((component, {name: (how if callable(how) else (lambda lang, key=how: text(key, lang)))
                                       for name, how in attributes.items()}))
        return component

    @property
    def components(self) -> list:
        return [component for component, _ in self.items]

    def updates(self, lang: str) -> list:
        import gradio as gr

        return [gr.update(**{name: how(lang) for name, how in attributes.items()}) for _, attributes in self.items]


def _option_component(field: form.OptionField, labels: Labels):
    import gradio as gr

    common = {"label": field.name, "info": field.help("en"), "elem_id": f"option-{field.name}"}
    if field.kind == "choice":
        choices = [(str(c), c) for c in field.choices] + ([(form.AUTO, form.AUTO)] if field.default is None else [])
        component = gr.Dropdown(choices, value=field.empty(), **common)
    elif field.kind == "bool":
        component = gr.Checkbox(value=field.default, **common)
    elif field.kind == "auto_bool":
        component = gr.Radio([form.AUTO, "true", "false"], value=form.AUTO, **common)
    elif field.kind in ("int", "float") and not field.optional:  # an empty gr.Number reads 0: unset needs a box
        component = gr.Number(value=field.default, precision=0 if field.kind == "int" else None, **common)
    else:
        component = gr.Textbox(value=field.empty(), lines=1, **common)
    labels.add(component, info=field.help)
    return component


def build(studio: Studio):
    """The page as a gr.Blocks (not launched)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before the import: no telemetry, no version check
    import gradio as gr

    labels = Labels()
    fields = studio.fields
    names = [f.name for f in fields]
    runs = str(studio.runs_dir)

    def values_of(args) -> dict[str, Any]:
        return dict(zip(names, args))

    with gr.Blocks(title="glmtune studio", analytics_enabled=False) as demo:
        remembered = gr.BrowserState("en", storage_key="glmtune-studio-language")
        with gr.Row():
            labels.add(gr.Markdown("## " + text("title", "en"), elem_id="title"), value=lambda lang: "## " + text("title", lang))
            language = gr.Radio([(label, code) for label, code in LANGUAGES], value="en", label=text("language", "en"),
                                elem_id="language", scale=0, min_width=220)
        labels.add(gr.Markdown(text("intro", "en")), value="intro")
        components: dict[str, Any] = {}
        with gr.Tabs():
            with gr.Tab(text("tab_model", "en"), elem_id="tab-model") as tab:
                labels.add(tab, label="tab_model")
                by_name = {f.name: f for f in fields}
                components["model"] = labels.add(
                    gr.Textbox(value=by_name["model"].default, label="model", info=text("model_info", "en"),
                               elem_id="option-model"), info="model_info")
                with gr.Row():
                    default_model = labels.add(gr.Button(text("use_default_model", "en"), elem_id="default-model"),
                                               value="use_default_model")
                    inspect_model = labels.add(gr.Button(text("inspect_model", "en"), variant="primary",
                                                         elem_id="inspect-model"), value="inspect_model")
                model_facts = gr.Markdown(elem_id="model-facts")
                fits = gr.Dataframe(headers=["method", "quantization", "GiB", "fits"], interactive=False,
                                    elem_id="model-fits", visible=False)
            with gr.Tab(text("tab_data", "en"), elem_id="tab-data") as tab:
                labels.add(tab, label="tab_data")
                for name, key in (("train_file", "train_file_label"), ("dev_file", "dev_file_label")):
                    field = by_name[name]
                    components[name] = labels.add(
                        gr.Textbox(value="", label=text(key, "en"), info=field.help("en"), elem_id=f"option-{name}"),
                        label=key, info=field.help)
                with gr.Row():
                    sample_data = labels.add(gr.Button(text("use_sample_data", "en"), elem_id="sample-data"),
                                             value="use_sample_data")
                    check_data = labels.add(gr.Button(text("check_data", "en"), variant="primary", elem_id="check-data"),
                                            value="check_data")
                data_facts = gr.Markdown(elem_id="data-facts")
                lengths = gr.Dataframe(headers=["part", *LENGTH_COLUMNS], interactive=False,
                                       visible=False, elem_id="data-lengths")
                data_cuts = gr.Markdown(elem_id="data-cuts")
                preview = gr.HTML(elem_id="data-preview")
            with gr.Tab(text("tab_options", "en"), elem_id="tab-options") as tab:
                labels.add(tab, label="tab_options")
                with gr.Row():
                    preset = labels.add(gr.Dropdown(preset_choices("en"), value="glmtune", label=text("preset", "en"),
                                                    info=text("preset_info", "en"), elem_id="preset", scale=3),
                                        label="preset", info="preset_info",
                                        choices=lambda lang: preset_choices(lang))
                    apply_preset = labels.add(gr.Button(text("apply_preset", "en"), elem_id="apply-preset", scale=1),
                                              value="apply_preset")
                for section in SECTIONS:
                    shown = [f for f in fields if f.section == section and f.name not in IN_OWN_TAB]
                    with gr.Accordion(text(f"section_{section}", "en"), open=section == "training",
                                      elem_id=f"section-{section}") as accordion:
                        labels.add(accordion, label=f"section_{section}")
                        for row in range(0, len(shown), 2):
                            with gr.Row():
                                for field in shown[row:row + 2]:
                                    components[field.name] = _option_component(field, labels)
                show_command = labels.add(gr.Button(text("show_command", "en"), elem_id="show-command"),
                                          value="show_command")
                options_message = gr.Markdown(elem_id="options-message")
                command = labels.add(gr.Textbox(label=text("command_label", "en"), interactive=False, lines=2,
                                                buttons=["copy"], elem_id="command"), label="command_label")
                yaml_box = labels.add(gr.Code(label=text("yaml_label", "en"), language="yaml", interactive=True,
                                              elem_id="yaml"), label="yaml_label")
                with gr.Row():
                    load_yaml = labels.add(gr.Button(text("load_yaml", "en"), elem_id="load-yaml"), value="load_yaml")
                    # holds the YAML last shown: a download button sends the file it holds when clicked
                    save_yaml = labels.add(gr.DownloadButton(text("save_yaml", "en"), elem_id="save-yaml"),
                                           label="save_yaml")
                    open_yaml = labels.add(gr.UploadButton(text("open_yaml", "en"), file_types=[".yaml", ".yml", ".json"],
                                                           elem_id="open-yaml"), label="open_yaml")
            with gr.Tab(text("tab_runs", "en"), elem_id="tab-runs") as tab:
                labels.add(tab, label="tab_runs")
                with gr.Row():
                    run_name = labels.add(gr.Textbox(label=text("run_name", "en"), info=text("run_name_info", "en", runs=runs),
                                                     elem_id="run-name", scale=3),
                                          label="run_name", info=lambda lang: text("run_name_info", lang, runs=runs))
                    start = labels.add(gr.Button(text("start", "en"), variant="primary", elem_id="start", scale=1),
                                       value="start")
                runs_message = gr.Markdown(elem_id="runs-message")
                with gr.Row():
                    run = labels.add(gr.Dropdown([], label=text("run_choice", "en"), elem_id="run", scale=3,
                                                 allow_custom_value=True), label="run_choice")
                    stop = labels.add(gr.Button(text("stop", "en"), variant="stop", elem_id="stop"), value="stop")
                    resume = labels.add(gr.Button(text("resume", "en"), elem_id="resume"), value="resume")
                    kill = labels.add(gr.Button(text("kill", "en"), elem_id="kill"), value="kill")
                    refresh = labels.add(gr.Button(text("refresh", "en"), elem_id="refresh"), value="refresh")
                progress = gr.Markdown(elem_id="progress")
                plot = labels.add(gr.Plot(label=text("loss_plot", "en"), elem_id="loss-plot", format="png"),
                                  label="loss_plot")
                log_box = labels.add(gr.Textbox(label=text("log", "en"), lines=10, max_lines=10, autoscroll=True,
                                                interactive=False, elem_id="log"), label="log")
                table = labels.add(gr.Dataframe(headers=_run_headers("en"), interactive=False, elem_id="runs",
                                                label=text("runs_table", "en", runs=runs)),
                                   headers=_run_headers, label=lambda lang: text("runs_table", lang, runs=runs))
                timer = gr.Timer(REFRESH_SECONDS)
            with gr.Tab(text("tab_results", "en"), elem_id="tab-results") as results_tab:
                labels.add(results_tab, label="tab_results")
                result_run = labels.add(gr.Dropdown([], label=text("run_choice", "en"), elem_id="result-run",
                                                    allow_custom_value=True), label="run_choice")
                metrics = gr.Markdown(elem_id="metrics")
                make_report = labels.add(gr.Button(text("make_report", "en"), elem_id="make-report"), value="make_report")
                report = gr.Markdown(elem_id="report")
                labels.add(gr.Markdown("### " + text("chat_heading", "en")),
                           value=lambda lang: "### " + text("chat_heading", lang))
                load_chat = labels.add(gr.Button(text("load_chat", "en"), elem_id="load-chat"), value="load_chat")
                chat_message = gr.Markdown(elem_id="chat-status")
                with gr.Row():
                    base_chat = labels.add(gr.Chatbot(label=text("base_chat", "en"), height=320, elem_id="chat-base"),
                                           label="base_chat")
                    tuned_chat = labels.add(gr.Chatbot(label=text("tuned_chat", "en"), height=320,
                                                       elem_id="chat-tuned"), label="tuned_chat")
                with gr.Row():
                    chat_tokens = labels.add(gr.Slider(1, 2048, value=256, step=1, precision=0,
                                                       label=text("max_new_tokens", "en"), elem_id="chat-tokens",
                                                       scale=1), label="max_new_tokens")
                    question = labels.add(gr.Textbox(show_label=False, placeholder=text("message", "en"), scale=4,
                                                     elem_id="chat-question"), placeholder="message")
                    send = labels.add(gr.Button(text("send", "en"), variant="primary", scale=1, elem_id="chat-send"),
                                      value="send")
                labels.add(gr.Markdown("### " + text("export_heading", "en")),
                           value=lambda lang: "### " + text("export_heading", lang))
                with gr.Row():
                    mode = labels.add(gr.Radio([(text("export_merge", "en"), "merge"),
                                                (text("export_adapter", "en"), "adapter")], value="merge",
                                               label=text("export_mode", "en"), elem_id="export-mode"),
                                      label="export_mode",
                                      choices=lambda lang: [(text("export_merge", lang), "merge"),
                                                            (text("export_adapter", lang), "adapter")])
                    export_folder = labels.add(gr.Textbox(label=text("export_folder", "en"), elem_id="export-folder"),
                                               label="export_folder")
                export = labels.add(gr.Button(text("export", "en"), elem_id="export"), value="export")
                export_message = gr.Markdown(elem_id="export-message")

        inputs = [components[name] for name in names]

        # -- language ---------------------------------------------------------------------------------
        def relabel(lang):
            lang = lang if lang in ("en", "zh") else "en"
            return [lang, lang, *labels.updates(lang)]

        language.change(relabel, [language], [remembered, language, *labels.components], queue=False)
        demo.load(relabel, [remembered], [remembered, language, *labels.components], queue=False)

        # -- model and data ---------------------------------------------------------------------------
        def on_inspect_model(model, lang):
            try:
                summary, rows = studio.describe_model(model, lang)
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), gr.update(visible=False)
            headers = [text(k, lang) for k in ("col_method", "col_quantization", "col_memory", "col_fits")]
            return summary, gr.update(value=rows, headers=headers, visible=True)

        default_model.click(lambda: by_name["model"].default, None, [components["model"]])
        inspect_model.click(on_inspect_model, [components["model"], language], [model_facts, fits])

        def on_sample_data():
            from glmtune.paths import sample_data_dir

            return str(sample_data_dir() / "train.jsonl"), str(sample_data_dir() / "dev.jsonl")

        sample_data.click(on_sample_data, None, [components["train_file"], components["dev_file"]])

        def on_check_data(lang, *args):
            try:
                summary, rows, cuts, shown = studio.inspect_data(values_of(args), lang)
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), gr.update(visible=False), "", ""
            headers = [text("col_part", lang), *LENGTH_COLUMNS]
            return summary, gr.update(value=rows, headers=headers, visible=True), cuts, shown

        check_data.click(on_check_data, [language, *inputs], [data_facts, lengths, data_cuts, preview])

        # -- options ----------------------------------------------------------------------------------
        def fill(values: dict[str, Any]) -> list:
            return [gr.update(value=values[name]) if name in values else gr.skip() for name in names]

        def on_preset(name, lang, *args):
            return ["", *fill(studio.preset(name, values_of(args)))]

        apply_preset.click(on_preset, [preset, language, *inputs], [options_message, *inputs])

        def on_show_command(lang, name, *args):
            try:
                shown, yaml_text = studio.command(values_of(args), name or "", lang)
                saved = studio.save_yaml(values_of(args))
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), gr.skip(), gr.skip(), gr.skip()
            return text("options_ok", lang), shown, yaml_text, gr.update(value=str(saved))

        show_command.click(on_show_command, [language, run_name, *inputs],
                           [options_message, command, yaml_box, save_yaml])

        def loaded(lang, source, content):
            try:
                values, ignored = studio.load_yaml(source, content)
                named = form.given_options(values, fields)
            except Exception as e:  # shown in the page (see _error)
                return [_error(e, lang), *[gr.skip()] * len(names)]
            message = text("yaml_loaded", lang, count=len(named))
            values = {name: value for name, value in values.items()  # the model and data stay unless it names them
                      if name not in USER_OWNED or name in named}
            if ignored:
                message += text("yaml_ignored", lang, names=", ".join(ignored))
            return [message, *fill(values)]

        load_yaml.click(lambda lang, content: loaded(lang, "YAML", content), [language, yaml_box],
                        [options_message, *inputs])

        def on_open_yaml(lang, upload):
            if upload is None:
                return [gr.skip()] * (len(names) + 2)
            path = Path(upload if isinstance(upload, str) else upload.name)
            try:
                content = path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                return [_error(e, lang), *[gr.skip()] * (len(names) + 1)]
            return [*loaded(lang, path.name, content), content]

        open_yaml.upload(on_open_yaml, [language, open_yaml], [options_message, *inputs, yaml_box])

        # -- runs -------------------------------------------------------------------------------------
        def runs_view(selected, lang, seen=None, follow=True):
            """Table, run choices, progress, loss plot and log of the selected run (the plot only when it changed);
            with `follow`, the Results tab shows the same run."""
            rows = studio.run_rows(lang)
            choices = [row[0] for row in rows]
            selected = selected if selected in choices else (choices[0] if choices else None)
            entries = studio.runs.curves(selected) if selected else []
            key = (selected, len(entries))  # the figure is drawn again only when the log grew
            plot_update = gr.skip() if seen is not None and key == seen else studio.curves(selected)
            log_text = studio.runs.log_tail(selected) if selected else ""
            results = gr.update(choices=choices, value=selected) if follow else gr.update(choices=choices)
            return (gr.update(value=rows, headers=_run_headers(lang)), gr.update(choices=choices, value=selected),
                    results, studio.progress(selected, lang) if selected else "", plot_update, log_text, key)

        seen = gr.State(None)
        view = [table, run, result_run, progress, plot, log_box, seen]

        def on_start(lang, name, *args):
            try:
                started = studio.start(values_of(args), name or "", lang)
            except Exception as e:  # shown in the page (see _error)
                return (_error(e, lang), *runs_view(None, lang))
            return (text("started", lang, name=html.escape(started)), *runs_view(started, lang))

        start.click(on_start, [language, run_name, *inputs], [runs_message, *view])

        def run_action(act: Callable[[str], Any], said: str):
            """A button that acts on the selected run and says so (or why not)."""

            def handler(selected, lang):
                try:
                    if not selected:
                        raise GlmtuneError(text("no_run", lang))
                    act(selected)
                    return text(said, lang, name=html.escape(selected))
                except Exception as e:  # shown in the page (see _error)
                    return _error(e, lang)

            return handler

        stop.click(run_action(studio.runs.stop, "stopping"), [run, language], [runs_message])
        resume.click(run_action(studio.runs.resume, "resumed"), [run, language], [runs_message])
        kill.click(run_action(studio.runs.kill, "killed"), [run, language], [runs_message])
        refresh.click(lambda selected, lang: runs_view(selected, lang), [run, language], view)
        run.input(lambda selected, lang: runs_view(selected, lang), [run, language], view)
        timer.tick(lambda selected, lang, shown: runs_view(selected, lang, shown, follow=False), [run, language, seen],
                   view, show_progress="hidden")
        demo.load(lambda selected, lang: runs_view(selected, lang), [run, remembered], view)

        # -- results ----------------------------------------------------------------------------------
        def on_result_run(selected, lang):
            try:
                return studio.results(selected, lang)
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), ""

        result_run.change(on_result_run, [result_run, language], [metrics, report])
        results_tab.select(on_result_run, [result_run, language], [metrics, report])

        def on_make_report(selected, lang):
            try:
                studio.make_report(selected, lang)
                return studio.results(selected, lang)
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), gr.skip()

        make_report.click(on_make_report, [result_run, language], [metrics, report])

        def on_load_chat(selected, lang):
            try:
                return studio.load_chat(selected, lang), [], []
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang), gr.skip(), gr.skip()

        load_chat.click(on_load_chat, [result_run, language], [chat_message, base_chat, tuned_chat])

        def on_send(message, base_shown, tuned_shown, tokens, lang):
            message = (message or "").strip()
            if not message:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            asked = {"role": "user", "content": message}
            try:
                for base_answer, tuned_answer in studio.chat(message, _turns(base_shown), _turns(tuned_shown), lang,
                                                                 int(tokens)):
                    yield ("", [*base_shown, asked, {"role": "assistant", "content": base_answer}],
                           [*tuned_shown, asked, {"role": "assistant", "content": tuned_answer}], "")
            except Exception as e:  # shown in the page (see _error)
                yield gr.skip(), gr.skip(), gr.skip(), _error(e, lang)

        gr.on([question.submit, send.click], on_send, [question, base_chat, tuned_chat, chat_tokens, language],
              [question, base_chat, tuned_chat, chat_message], trigger_mode="once")

        def on_export(selected, chosen, folder, lang):
            try:
                return html.escape(studio.export(selected, chosen == "merge", folder, lang)).replace("\n", "  \n")
            except Exception as e:  # shown in the page (see _error)
                return _error(e, lang)

        export.click(on_export, [result_run, mode, export_folder, language], [export_message])
    return demo


def _run_headers(lang: str) -> list[str]:
    return [text(k, lang) for k in ("col_name", "col_status", "col_step", "col_method", "col_model")]


def _turns(shown: list) -> list[tuple[str, str]]:
    """(role, text) of each message of a chatbot's value, as Gradio hands it back."""
    turns = []
    for message in shown or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # Gradio 6 gives the parts of a message
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if isinstance(content, str):
            turns.append((message["role"], content))
    return turns


def launch(runs_dir: str | Path, *, host: str, port: int, announce: Callable[[], None] | None = None) -> None:
    """Serves the studio until Ctrl-C or SIGTERM. Runs it started keep running after it stops."""
    runs_dir = Path(runs_dir)
    private = runs_dir / STUDIO_FOLDER
    (private / "gradio").mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(private / "gradio")  # uploads stay inside the runs folder
    studio = Studio(runs_dir)
    try:
        serve_page(build(studio), host=host, port=port, concurrency=4, announce=announce,
                   allowed_paths=[str(private / "configs")], css=CSS)
    finally:
        studio.close_chat()
