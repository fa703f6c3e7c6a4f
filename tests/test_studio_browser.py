"""`glmtune studio` in a real (headless) browser: the default model and the sample data, a 3-step run that
finishes while the loss plot fills, the tuned model's answer in the chat, the language switch (remembered
after a reload), and the run equal to the `glmtune train` command the page shows. Screenshots of every step
are kept in $GLMTUNE_TEST_ARTIFACTS/studio (default test-artifacts/studio); docs/images/studio-*.png are
copies of them."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from pathlib import Path

import pytest

from glmtune.data.formats import Message

QUESTION = "这句话有哪些三元组？用json回答：启辰教育的董事长朱凯艳祖籍南京。"
ANSWER_TOKENS = 24


@pytest.fixture
def artifacts() -> Path:
    folder = Path(os.environ.get("GLMTUNE_TEST_ARTIFACTS", "test-artifacts")) / "studio"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def studio_url(browser_paths, glmtune_running, tmp_path):
    """`glmtune studio` on a free port with its runs folder in tmp_path (after the browser checks)."""
    with glmtune_running(["studio", "--port", "0", "--runs-dir", str(tmp_path / "runs")],
                         r"studio at (http://\S+)", timeout=120) as ready:
        yield ready.group(1)


def _normalise(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.slow
def test_studio_in_a_real_browser(tmp_path, browser_paths, studio_url, artifacts):
    from conftest import headless_chrome
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chrome(browser_paths, tmp_path / "profile", size="1280,1000")
    shots = []

    def shot(name: str, top: str | None = None) -> None:
        """A screenshot, with the element `top` (a CSS selector) scrolled to the top of the window."""
        if top:
            driver.execute_script("arguments[0].scrollIntoView(true)", element(top))
            time.sleep(0.3)
        path = artifacts / f"{len(shots) + 1:02d}-{name}.png"
        assert driver.save_screenshot(str(path))
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
        shots.append(path)

    def wait(condition, seconds: float = 30):
        return WebDriverWait(driver, seconds, poll_frequency=0.3,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)

    def element(css: str):
        return wait(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def box(elem_id: str):
        """The input of a Gradio field (textbox, number, dropdown)."""
        return element(f"#{elem_id} textarea, #{elem_id} input")

    def type_into(elem_id: str, value: str) -> None:
        field = box(elem_id)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(value)
        field.send_keys(Keys.TAB)

    def tab(label: str) -> None:
        wait(lambda d: next(b for b in d.find_elements(By.CSS_SELECTOR, "[role='tab']") if label in b.text)).click()

    def text_of(elem_id: str) -> str:
        return driver.find_element(By.ID, elem_id).text

    import subprocess

    fonts = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout
    assert fonts.strip(), "no Chinese font: the Chinese page would show boxes (make browser installs fonts-wqy-microhei)"
    try:
        driver.get(studio_url)
        element("#default-model")
        shot("start")

        # 1 model: the default model, inspected without loading its weights
        element("#default-model").click()
        element("#inspect-model").click()
        wait(lambda d: "smollm2-135m" in text_of("model-facts") and "134.52M" in text_of("model-facts"), 60)
        assert "lora" in text_of("model-fits")
        shot("model")

        # 2 data: the sample data, checked, with the trained part of each row marked
        tab("Data")
        element("#sample-data").click()
        wait(lambda d: box("option-train_file").get_attribute("value").endswith("train.jsonl"))
        element("#check-data").click()
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#data-preview mark.trained"), 90)
        assert "samples" in text_of("data-facts")
        shot("data", top="#data-lengths")

        # 3 options: 3 steps, a loss at each, a short evaluation; the command it stands for
        tab("Options")
        type_into("option-max_steps", "0")  # a mistake first: one readable message in the page
        element("#show-command").click()
        wait(lambda d: "max_steps must be at least 1" in text_of("options-message"))
        # the rest from a config file, opened through the page: it lands inside the runs folder, and the
        # options the studio owns (output_dir) are ignored with a word
        config = tmp_path / "short.yaml"
        config.write_text("logging_steps: 1\nmax_eval_samples: 8\noutput_dir: /tmp/elsewhere\n", encoding="utf-8")
        element("input[type='file'][accept*='.yaml']").send_keys(str(config))  # Open a YAML file's input
        wait(lambda d: "Loaded 2 options" in text_of("options-message") and "output_dir" in text_of("options-message"))
        assert list((tmp_path / "runs" / ".studio" / "gradio").rglob("short.yaml")), "uploads stay in the runs folder"
        element("#section-data .label-wrap").click()  # the data options' accordion starts closed
        assert box("option-max_eval_samples").get_attribute("value") == "8"
        assert box("option-max_steps").get_attribute("value") == "", "an option the file does not name: its default"
        assert box("option-train_file").get_attribute("value").endswith("train.jsonl"), "the data stays"
        type_into("option-max_steps", "3")
        element("#show-command").click()
        wait(lambda d: "--max-steps 3" in box("command").get_attribute("value"))
        shown_command = box("command").get_attribute("value")
        shot("options", top="#show-command")

        # 4 runs: start, and watch the loss plot fill as the run goes to the end
        tab("Runs")
        type_into("run-name", "browser-run")
        plot_before = driver.find_elements(By.CSS_SELECTOR, "#loss-plot img")
        element("#start").click()
        wait(lambda d: "browser-run" in text_of("progress"), 30)
        shot("run-started")
        wait(lambda d: "finished" in text_of("progress"), 300)
        wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#loss-plot img"), 30)
        assert not plot_before, "the plot had nothing to draw before the run"
        time.sleep(1)
        shot("run-finished", top="#run")
        assert "3" in text_of("progress")
        folder = tmp_path / "runs" / "browser-run"
        losses = [line for line in (folder / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
        assert len(losses) == 3

        # the run is the command the page showed: the same resolved config as `glmtune train` would use
        from glmtune.config import to_yaml
        from glmtune.train.dry_run import dry_run
        from test_studio import _cli_config

        words = shlex.split(shown_command)
        assert words[-2:] == ["--output-dir", str(tmp_path / "runs" / "NAME")]
        words[-1] = str(tmp_path / "same-command")  # a fresh folder: the run's own now holds a run
        resolved = dataclasses.replace(dry_run(_cli_config(words[2:])).config, output_dir=str(folder))
        assert to_yaml(resolved) == (folder / "resolved_config.yaml").read_text()

        # 5 results: metrics, then chat with the base and the tuned model side by side
        tab("Results")
        wait(lambda d: "3 steps" in text_of("metrics"), 30)
        element("#load-chat").click()
        wait(lambda d: "Loaded" in text_of("chat-status"), 120)
        type_into("chat-tokens", str(ANSWER_TOKENS))
        question = box("chat-question")
        question.send_keys(QUESTION)
        question.send_keys(Keys.ENTER)
        seen = []

        def answered(d):
            bots = d.find_elements(By.CSS_SELECTOR, "#chat-tuned [data-testid='bot']")
            trackers = d.find_elements(By.CSS_SELECTOR, "#chat-tuned [data-testid='status-tracker'], "
                                                        "#chat-base [data-testid='status-tracker']")
            done = bots and all("hide" in t.get_attribute("class").split() for t in trackers)
            seen.append(bots[-1].text if done else None)
            return seen[-1] if len(seen) > 1 and seen[-1] and seen[-1] == seen[-2] else False

        tuned_answer = wait(answered, 180)
        shot("chat", top="#load-chat")
        from glmtune.config import GenerationOptions
        from glmtune.inference.generate import Generator
        from glmtune.methods.adapter import load_tuned_model

        loaded, info = load_tuned_model(None, folder / "adapter")
        expected = Generator(loaded, info.get("template") or "auto").generate(
            [[Message("user", QUESTION)]], GenerationOptions(max_new_tokens=ANSWER_TOKENS))[0]
        assert expected.strip() and _normalise(tuned_answer) == _normalise(expected)

        # the language switch: Chinese labels, remembered after a reload
        element("#language input[value='zh']").click()
        wait(lambda d: any("结果" in b.text for b in d.find_elements(By.CSS_SELECTOR, "[role='tab']")))
        assert element("#load-chat").text == "载入基座模型和微调后的模型"
        shot("chinese")
        driver.refresh()
        wait(lambda d: any("训练" in b.text for b in d.find_elements(By.CSS_SELECTOR, "[role='tab']")), 30)
        tab("训练")
        assert element("#start").text == "开始训练"
        wait(lambda d: "已完成" in text_of("progress"), 30)
        shot("chinese-runs", top="#run")
    except BaseException:
        print("PAGE MESSAGES:", [(i, e.text) for i in ("options-message", "runs-message", "progress")
                                 for e in driver.find_elements(By.ID, i)])
        driver.save_screenshot(str(artifacts / "failure.png"))  # the page as it was when the test failed
        raise
    finally:
        driver.quit()
