"""The vision demo's synthetic data: questions answered from the scene, pictures whose cells show the scene's
colours, and chat JSONL whose image parts point at (or embed) those pictures."""

import base64
import io
import json
import random
from urllib.parse import unquote, urlparse

import pytest

from seekmoe.vision_demo_data import (COLOURS, Scene, balanced_questions, draw, main, position_name, question_kind,
                                     questions, random_scene, write_chat_dataset)

PIL = pytest.importorskip("PIL.Image")

SCENE = Scene(3, (("red", "circle"), None, None,
                  None, ("blue", "square"), None,
                  ("red", "triangle"), None, ("green", "circle")))


def test_questions_are_answered_from_the_scene():
    pairs = dict(questions(SCENE))
    assert pairs["how many red shapes are there"] == "two"
    assert pairs["how many yellow shapes are there"] == "zero"
    assert pairs["how many circles are there"] == "two"
    assert pairs["what is at the top left"] == "circle" and pairs["what is at the top"] == "nothing"
    assert pairs["what is at the centre"] == "square" and pairs["what is at the bottom left"] == "triangle"
    assert pairs["what colour is the square"] == "blue" and pairs["what colour is the triangle"] == "red"
    assert "what colour is the circle" not in pairs  # two circles: no single answer
    assert position_name(5, 4) == "row 2 column 2"


def test_balanced_questions_are_distinct_and_ask_each_kind_alike():
    rng = random.Random(0)
    kinds, answers = [], []
    for _ in range(300):
        scene = random_scene(rng)
        pairs = balanced_questions(scene, rng, 3)
        assert len(set(pairs)) == 3 and set(pairs) <= set(questions(scene))
        kinds += [question_kind(q) for q, _ in pairs]
        answers += [a for q, a in pairs if question_kind(q) == "position"]
    for kind in ("count", "position", "colour"):
        assert 0.2 < kinds.count(kind) / len(kinds) < 0.45, kind
    assert 0.3 < answers.count("nothing") / len(answers) < 0.7  # not the ~75% of cells that are empty
    one = Scene(1, (("red", "circle"),))  # 4 colour counts, 3 shape counts, 1 position, 1 colour question
    assert sorted(balanced_questions(one, rng, 50)) == sorted(questions(one))


def test_random_scenes_hold_the_asked_number_of_objects_in_distinct_cells():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng, grid=4, min_objects=2, max_objects=5)
        assert 2 <= len(scene.objects()) <= 5 and len(scene.cells) == 16
    with pytest.raises(ValueError, match="objects 1..10: expected"):
        random_scene(rng, grid=3, max_objects=10)


def test_each_cell_is_drawn_in_its_objects_colour_and_empty_cells_stay_background():
    image = draw(SCENE, size=96)
    assert image.size == (96, 96) and image.mode == "RGB"
    for i, cell in enumerate(SCENE.cells):
        centre = (int((i % 3 + 0.5) * 32), int((i // 3 + 0.5) * 32) + 4)  # a little low: inside a triangle too
        assert image.getpixel(centre) == (COLOURS[cell[0]] if cell else (245, 245, 245))


@pytest.mark.parametrize("inline", [False, True])
def test_chat_dataset_records_hold_an_image_part_a_question_and_the_answer(tmp_path, inline):
    path = write_chat_dataset(tmp_path / "data", n_scenes=3, questions_per_scene=2, inline=inline, size=48)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 6
    for record in records:
        user, assistant = record["messages"]
        image_part, text_part = user["content"]
        assert user["role"] == "user" and image_part["type"] == "image_url" and text_part["type"] == "text"
        assert text_part["text"].endswith("?") and assistant["role"] == "assistant"
        assert assistant["content"] and " " not in assistant["content"]  # a one-word answer
        url = image_part["image_url"]["url"]
        if inline:
            assert url.startswith("data:image/png;base64,")
            data = io.BytesIO(base64.b64decode(url.split(",", 1)[1]))
        else:
            assert url.startswith("file:///")
            data = unquote(urlparse(url).path)
        assert PIL.open(data).size == (48, 48)
    assert len(list((tmp_path / "data" / "images").glob("*.png"))) == (0 if inline else 3)


def test_the_module_command_writes_a_dataset_and_refuses_impossible_scenes(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--scenes", "2", "--questions", "1", "--grid", "4", "--max-objects", "16"]) == 0
    assert len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 2
    assert main([str(tmp_path / "e"), "--max-objects", "10"]) == 2
    assert "objects 1..10: expected" in capsys.readouterr().err
    full = Scene(4, (("red", "circle"),) * 12 + (None,) * 4)
    assert dict(questions(full))["how many red shapes are there"] == "12"
