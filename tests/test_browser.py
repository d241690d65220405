"""A real browser on a real Label Studio: what an annotator sees of the backend, and the screenshots.

Debian's Chromium (`apt-get install chromium`), driven by Playwright (PyPI; its own browser download
cannot work here) through `executable_path`, against the session's headless Label Studio and the backend
under gunicorn. The tests log in as the test user, open tasks of projects connected to the backend and
read what the labeling screen shows: the pre-filled caption of the Image Captioning template, the
answers of the Visual Question Answering template (and a question typed into one of its answer fields,
answered with Auto-Annotation on), and, in a project with a question box, BLIP's answer in a TextArea
and its choice in a Choices after the annotator typed a question, then a caption continued from typed
text. Follow-up questions run the vision encoder no more (the backend's /metrics).

Marker `browser` (in the default run; ~1-2 min). Without Chromium or Playwright they are skipped, saying
why. `make screenshots` runs them with SCREENSHOTS_DIR=docs and writes the README's pictures there
(palette PNGs, a few dozen KB each); without a browser it fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests
from label_studio_server import PASSWORD, USER, data_uri, png, served_backend, upload
from scenes import fully_right
from templates import CAPTIONING, vqa

from model_build.tiny_blip.synthetic import COLOURS, HELD_OUT_SEED, make_scenes

pytestmark = pytest.mark.browser

SCREENSHOTS = os.environ.get("SCREENSHOTS_DIR")  # set by `make screenshots`
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# as root Chromium needs --no-sandbox; the rest keeps it from reaching for Google's hosts, which this
# closed network refuses (many connections at a time)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1100, "height": 960}

# a question box and what it answers into, next to the image (the layout is ordinary Label Studio XML)
DEMO = f"""<View style="display: flex; gap: 1.5em">
  <View style="flex: 0 0 44%">
    <Image name="image" value="$image"/>
  </View>
  <View style="flex: 1">
    <Header value="Caption"/>
    <TextArea name="caption" toName="image" rows="2" maxSubmissions="1"
              placeholder="Type the start of a caption, then Shift+Enter"/>
    <Header value="Ask BLIP about the image"/>
    <TextArea name="ask" toName="image" rows="2" maxSubmissions="1"
              placeholder="Type a question, then Shift+Enter"/>
    <Header value="Answer"/>
    <TextArea name="answer" toName="image" question="#ask" smart="false"/>
    <Header value="Colour"/>
    <Choices name="colour" toName="image" question="#ask" smart="false" showInline="true">
      {"".join(f'<Choice value="{c}"/>' for c in COLOURS)}
    </Choices>
  </View>
</View>"""


def unavailable(why: str) -> None:
    if SCREENSHOTS:  # `make screenshots` must not pass without making them
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        unavailable("no Chromium: apt-get install chromium (.ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("no Playwright: pip install -e '.[test]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def served(label_studio, tiny_dir, tmp_path_factory):
    """The backend under gunicorn, downloading uploads from the test Label Studio."""
    ls_url, token = label_studio
    log = tmp_path_factory.mktemp("browser-backend") / "backend.log"
    with served_backend(tiny_dir, log, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=token) as url:
        yield url


@pytest.fixture
def page(chromium, label_studio):
    """A logged-in labeling session of the test user, fresh per test: Label Studio keeps the
    Auto-Annotation toggle in the browser's storage, and a test clicks it on."""
    url, _ = label_studio
    context = chromium.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{url}/user/login/")
    page.fill("input[name=email]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/user/login" not in u)
    yield page
    context.close()


@pytest.fixture(scope="module")
def scenes(blip):
    """Held-out scenes the model gets entirely right (as in the other end-to-end tests)."""
    good = fully_right(blip, make_scenes(30, HELD_OUT_SEED))
    assert len(good) >= 4
    return good


def qa(scene, kind: str):
    return next(q for q in scene.qa if q.kind == kind)


def open_task(page, label_studio, project_id: int, task_id: int) -> None:
    url, _ = label_studio
    page.goto(f"{url}/projects/{project_id}/data?task={task_id}")
    page.get_by_test_id("textarea-control").first.wait_for()


def texts(page, name: str) -> list[str]:
    """The texts a TextArea holds, as shown."""
    return [t.strip() for t in page.locator(f'[name^="{name}:"]').all_inner_texts()]


def wait_for_texts(page, name: str, expected: list[str]) -> None:
    page.wait_for_function(
        """([name, expected]) => {
            const shown = [...document.querySelectorAll(`[name^="${name}:"]`)].map(e => e.innerText.trim());
            return JSON.stringify(shown) === JSON.stringify(expected);
        }""",
        arg=[name, expected],
        timeout=20_000,
    )


def show(page, name: str) -> None:
    """Scrolls a TextArea's last text into view and waits until it stays there: Label Studio lays the
    image out again once it has loaded and been zoomed to fit, which can push the text off screen."""
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    text = page.locator(f'[name^="{name}:"]').last
    # seen: what the page shows at the text's centre is the text (not a toolbar over it, not a scroll
    # container's edge clipping it)
    seen = """e => { const r = e.getBoundingClientRect();
                     const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
                     return r.height > 0 && hit !== null && (e.contains(hit) || hit.contains(e)); }"""
    text.evaluate("e => e.scrollIntoView({block: 'center'})")
    settled = 0
    for _ in range(50):
        if text.evaluate(seen):
            settled += 1
            if settled == 3:  # in view on three looks 200 ms apart: the layout has settled
                return
        else:
            settled = 0
            text.evaluate("e => e.scrollIntoView({block: 'center'})")
        page.wait_for_timeout(200)
    raise AssertionError(f"{name}'s text does not stay in view")


def screenshot(page, name: str, tmp_path: Path) -> Path:
    """A PNG of the page; with SCREENSHOTS_DIR, an optimised copy there (a 64-colour palette: the UI's
    flat colours and the synthetic scenes lose nothing visible)."""
    from PIL import Image

    raw = tmp_path / f"{name}.raw.png"
    page.screenshot(path=str(raw))
    out = (Path(SCREENSHOTS) if SCREENSHOTS else tmp_path) / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=64, dither=Image.Dither.NONE).save(out, optimize=True)
    if SCREENSHOTS:  # committed to the repository: keep it small
        assert out.stat().st_size < 150_000, f"{out} is {out.stat().st_size} bytes"
    return out


def metrics(backend: str) -> dict:
    return requests.get(f"{backend}/metrics", timeout=5).json()


def connect(ls, backend: str, title: str, config: str, interactive: bool = False):
    project = ls.projects.create(title=title, label_config=config)
    ls.ml.create(project=project.id, url=backend, title="BLIP", is_interactive=interactive)
    return project


def test_a_pre_annotated_captioning_task(ls, label_studio, served, page, scenes, tmp_path):
    scene = scenes[0]
    project = connect(ls, served, "Image Captioning", CAPTIONING)
    upload(label_studio, project.id, {"scene.png": png(scene.image)})
    (task,) = ls.tasks.list(project=project.id)
    open_task(page, label_studio, project.id, task.id)  # no prediction yet: Label Studio asks the backend
    wait_for_texts(page, "caption", [scene.caption])
    show(page, "caption")
    screenshot(page, "captioning", tmp_path)


def test_the_visual_question_answering_template(ls, label_studio, served, page, scenes, tmp_path):
    scene = scenes[1]
    project = connect(ls, served, "Visual Question Answering", vqa(2), interactive=True)
    count, colour = qa(scene, "count"), qa(scene, "colour")
    ls.projects.import_tasks(
        id=project.id, request=[{"image": data_uri(scene.image), "q1": count.question, "q2": ""}]
    )
    (task,) = ls.tasks.list(project=project.id)
    open_task(page, label_studio, project.id, task.id)
    wait_for_texts(page, "answer1", [count.answer])
    assert texts(page, "answer2") == []  # the task has no second question
    # with Auto-Annotation on, a question typed into the empty answer field is answered below it
    page.get_by_test_id("bottombar-auto-annotation-toggle").click()
    field = page.locator("input[name=answer2]")
    field.fill(colour.question)
    field.press("Enter")
    wait_for_texts(page, "answer2", [colour.question, colour.answer])
    show(page, "answer2")
    screenshot(page, "vqa", tmp_path)


def test_asking_blip_while_labeling(ls, label_studio, served, page, scenes, blip, tmp_path):
    scene = scenes[2]
    project = connect(ls, served, "Ask BLIP", DEMO, interactive=True)
    upload(label_studio, project.id, {"scene.png": png(scene.image)})
    (task,) = ls.tasks.list(project=project.id)
    before = metrics(served)
    open_task(page, label_studio, project.id, task.id)
    wait_for_texts(page, "caption", [scene.caption])  # pre-annotated when opened
    page.get_by_test_id("bottombar-auto-annotation-toggle").click()

    colour = qa(scene, "colour")
    box = page.locator("textarea[name=ask]")
    box.fill(colour.question)
    box.press("Shift+Enter")
    wait_for_texts(page, "answer", [colour.answer])
    page.wait_for_function(f"() => document.querySelector('input[name={colour.answer}]').checked")
    assert texts(page, "ask") == [colour.question]  # the question stays where the annotator typed it
    assert not any(page.locator(f"input[name={c}]").is_checked() for c in COLOURS if c != colour.answer)
    assert texts(page, "caption") == [scene.caption]  # the caption BLIP wrote is left alone
    screenshot(page, "interactive", tmp_path)

    # a follow-up question: delete the first (maxSubmissions=1), ask another
    count = qa(scene, "count")
    page.locator('[data-testid="textarea-region"]:has([name^="ask:"])').get_by_test_id(
        "htx-textbox-delete-button"
    ).click()
    box.fill(count.question)
    box.press("Shift+Enter")
    wait_for_texts(page, "answer", [count.answer])

    # a caption continued from typed text
    prompt = "a " + scene.caption.split()[-1]
    expected = blip.caption([scene.image], prompt=prompt)[0].text
    page.locator('[data-testid="textarea-region"]:has([name^="caption:"])').get_by_test_id(
        "htx-textbox-delete-button"
    ).click()
    page.locator("textarea[name=caption]").fill(prompt)
    page.locator("textarea[name=caption]").press("Shift+Enter")
    wait_for_texts(page, "caption", [expected])
    assert expected.startswith(prompt)

    # opening the task encoded the image once; the questions and the caption after it, never again
    after = metrics(served)
    assert after["images_encoded"] - before["images_encoded"] == 1
    assert after["images_fetched"] - before["images_fetched"] == 1
