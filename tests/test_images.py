"""Image classification: MNIST's IDX files and fixed split, image folders and files with images, the CNN / MLP from
zero as transformers models, unreadable images, augmentation, predict / eval on image runs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import NO_REPORT, REPO, SHARED_DATA, require_shared
from PIL import Image

from llmtune import load_recipe, train, validate
from llmtune.cli import main
from llmtune.errors import LlmtuneError

MNIST = SHARED_DATA / "mnist"


@pytest.fixture(scope="module")
def mnist() -> dict:
    require_shared(MNIST / "t10k-images-idx3-ubyte.gz")
    from llmtune.data.images import read_idx

    return read_idx(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")


def digit_png(rows, index: int, path, mode: str = "L", size: int = 28):
    image = Image.fromarray(np.array(rows[index]["image"], dtype=np.uint8)).convert(mode).resize((size, size))
    image.save(path)
    return path


def image_folder(tmp_path, rows, per_class: int = 12, classes=(0, 1)):
    """A folder with one subfolder per digit class, PNGs of mixed sizes and modes, like images from the wild."""
    folder = tmp_path / "digits"
    labels = np.array(rows["label"][:600])
    for digit in classes:
        (folder / f"d{digit}").mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(labels == digit)[:per_class]):
            mode, size = ("RGB", 40) if n % 3 == 0 else ("L", 28)
            digit_png(rows, int(i), folder / f"d{digit}" / f"{n}.png", mode, size)
    return folder


def test_mnist_idx_files_give_the_documented_fixed_split(mnist):
    recipe = load_recipe(REPO / "recipes" / "mnist_cnn_scratch.yaml", [f"data.dataset={MNIST}"])
    from llmtune.data.loading import load_splits

    splits = load_splits(recipe.data, seed=1)
    assert (len(splits["train"]), len(splits["eval"])) == (8000, 2000)
    assert mnist["label"][:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the data README's first labels
    assert splits["eval"][0]["label"] == mnist[4]["label"] and splits["eval"][1]["label"] == mnist[9]["label"]
    assert np.bincount(mnist["label"]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("architecture", ["cnn", "mlp"])
def test_scratch_models_round_trip_through_save_pretrained_with_identical_logits(architecture, tmp_path):
    from transformers import AutoModelForImageClassification

    from llmtune.models.vision import SCRATCH_MODELS

    config_class, model_class = SCRATCH_MODELS[architecture]
    model = model_class(config_class(num_labels=10, image_mean=[0.13], image_std=[0.31])).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixels = torch.randn(3, 1, 28, 28)
    assert type(loaded) is model_class and loaded.config.image_mean == [0.13]
    assert torch.equal(model(pixel_values=pixels).logits, loaded(pixel_values=pixels).logits)


@pytest.mark.slow  # trains on 1,000 real digits to an accuracy floor (3 s)
def test_cnn_learns_real_digits(mnist, tmp_path):
    """A few seconds on 1,000 real digits: far above chance."""
    run_dir = tmp_path / "cnn"
    metrics = train(load_recipe(REPO / "recipes" / "mnist_cnn_scratch.yaml", [
        f"data.dataset={MNIST}", "data.max_train_samples=1000", "data.max_eval_samples=300", "training.epochs=4",
        "training.save_every=no", f"output.dir={run_dir}", NO_REPORT]))
    assert metrics["after"]["accuracy"] > 0.85 > metrics["before"]["accuracy"] + 0.5
    details = metrics["eval_details"]
    assert np.array(details["confusion_matrix"]).sum() == 300 and details["labels"] == [str(d) for d in range(10)]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["pixels"]["size"] == 28 and record["pixels"]["channels"] == 1
    assert 0.1 < record["pixels"]["mean"][0] < 0.2  # measured on the digits: mostly black


def test_image_folder_with_a_corrupt_file_and_mixed_modes_trains_and_counts_the_skip(mnist, tmp_path, capsys):
    folder = image_folder(tmp_path, mnist)
    (folder / "d1" / "broken.png").write_bytes(b"\x89PNG but not really")
    run_dir = tmp_path / "run"
    train(load_recipe(REPO / "recipes" / "mnist_mlp_scratch.yaml", [
        f"data.dataset={folder}", "data.holdout_every=null", "data.validation_fraction=0.25", "training.epochs=2",
        "training.save_every=no", f"output.dir={run_dir}", NO_REPORT]))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["labels"] == ["d0", "d1"]  # imagefolder's class names
    assert sum(record["skipped_images"].values()) == 1 and sum(record["data_sizes"].values()) == 24
    assert record["pixels"]["channels"] == 1  # the first image decides; the RGB ones were converted
    # Evaluating is different: the user asked about every file, so a broken one is an error that names it.
    from llmtune.data.loading import load_image_rows
    from llmtune.inference.image_classifier import ImageClassifier

    with pytest.raises(LlmtuneError, match="broken.png"):
        ImageClassifier.load(run_dir).evaluate(load_image_rows(str(folder), "--data"), ["accuracy"])
    (folder / "d1" / "broken.png").unlink()
    from llmtune.cli import main

    assert main(["eval", str(run_dir), "--data", str(folder), "--metrics", "accuracy", "f1"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 24
    # Predicting files of any size and mode: a 28 x 28 grayscale digit and a 56 x 56 RGB copy of another (converted
    # and resized), one JSON line each, labelled as the library labels the same pixels.
    files = [digit_png(mnist, 4, tmp_path / "a.png"), digit_png(mnist, 9, tmp_path / "b.png", "RGB", 56)]
    assert main(["predict", str(run_dir), "--image", str(files[0]), "--image", str(files[1])]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["image"] for line in lines] == [str(f) for f in files]
    assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-3 for line in lines)
    classifier = ImageClassifier.load(run_dir)
    expected = [classifier.labels[int(p.argmax())] for p in classifier.probabilities(
        [np.array(mnist[4]["image"], dtype=np.uint8), np.array(Image.open(files[1]))])]
    assert [line["label"] for line in lines] == expected


def test_parquet_rows_with_image_bytes_and_relative_paths(mnist, tmp_path):
    import pandas as pd

    rows = []
    for i in range(40):
        buffer = io.BytesIO()
        Image.fromarray(np.array(mnist[i]["image"], dtype=np.uint8)).save(buffer, format="PNG")
        rows.append({"picture": {"bytes": buffer.getvalue(), "path": None}, "digit": int(mnist[i]["label"])})
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    (tmp_path / "imgs").mkdir()
    listed = [{"picture": str(digit_png(mnist, i, tmp_path / "imgs" / f"{i}.png").relative_to(tmp_path)),
               "digit": int(mnist[i]["label"])} for i in range(40, 60)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in listed))
    metrics = train(load_recipe({
        "task": "image_classification", "model": {"init": "scratch"}, "scratch": {"architecture": "mlp", "layers": 1},
        "data": {"train_file": str(tmp_path / "train.parquet"), "eval_file": str(tmp_path / "eval.jsonl"),
                 "label_column": "digit"},
        "image": {"column": "picture"}, "training": {"epochs": 1, "save_every": "no"},
        "output": {"dir": str(tmp_path / "run"), "report": False}}))
    assert 0 <= metrics["after"]["accuracy"] <= 1
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["data_sizes"] == {"train": 40, "eval": 20} and not record["skipped_images"]
    assert record["labels"] == [str(d) for d in sorted({int(mnist[i]["label"]) for i in range(40)})]


def test_augmentation_shifts_and_rotates_training_batches_only():
    from llmtune.data.images import PixelSpec, augment, batch_transform

    spec = PixelSpec(28, 1, [0.0], [1.0])
    pixels = np.zeros((28, 28, 1), dtype=np.uint8)
    pixels[10:18, 12:16] = 255
    moved = [augment(pixels, 0.1, 10) for _ in range(8)]
    assert any(not np.array_equal(m, pixels) for m in moved) and all(m.shape == pixels.shape for m in moved)
    assert all(abs(int(m.astype(int).sum()) - int(pixels.astype(int).sum())) < 0.5 * pixels.sum() for m in moved)
    plain = batch_transform(spec)({"pixels": [pixels.tobytes()]})["pixel_values"][0]
    assert torch.equal(plain, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


def test_bad_image_sources_get_one_paragraph_errors_and_nothing_is_written(mnist, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("no images here")
    one_class = image_folder(tmp_path, mnist, per_class=3, classes=(0,))
    unreadable = tmp_path / "unreadable"
    for name in ("a", "b"):
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / "x.png").write_bytes(b"garbage")
    base = ["task=image_classification", "model.init=scratch", "scratch.architecture=cnn",
            f"output.dir={tmp_path / 'never'}"]
    cases = {
        "one_class": ([f"data.dataset={one_class}"], "at least two"),
        "unreadable": ([f"data.dataset={unreadable}"], "None of the first"),
        "wrong_architecture": ([f"data.dataset={one_class}", "scratch.architecture=gpt2"], "cnn or mlp"),
        "both_prunings": ([f"data.dataset={one_class}", "model.init=pretrained", "model.keep_layers=[0]",
                           "model.num_layers=1"], "keep one"),
        "shift": ([f"data.dataset={one_class}", "image.shift=0.9"], "image.shift"),
    }
    for extra, message in cases.values():
        with pytest.raises(LlmtuneError, match=message):
            validate(load_recipe(None, [*base, *extra]))
    code = main(["train", str(REPO / "recipes" / "mnist_cnn_scratch.yaml"), f"data.dataset={empty}",
                 f"output.dir={tmp_path / 'never'}"])
    error = capsys.readouterr().err
    assert code != 0 and "Traceback" not in error and str(empty) in error
    assert not (tmp_path / "never").exists()


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> str:
    """A 2-block, 32-wide ViT with random weights and an image processor (28 x 28, RGB), saved like a Hub checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_pretrained_vision_checkpoint_full_and_lora_with_pruning(method, tiny_vit, mnist, tmp_path):
    """A pretrained checkpoint gets a new head for the data's labels and its processor's pixel format (RGB, its mean
    and std); pruned to one block it still saves as a plain ViT; a LoRA run saves an adapter that predict loads."""
    from transformers import AutoModelForImageClassification

    run_dir = tmp_path / method
    train(load_recipe(None, [
        "task=image_classification", f"model.name={tiny_vit}", f"method.type={method}",
        *(["model.keep_layers=[1]"] if method == "full" else []),
        f"data.dataset={MNIST}", "data.holdout_every=5", "data.max_train_samples=64", "data.max_eval_samples=16",
        "training.epochs=1", "training.batch_size=16", "training.save_every=no", f"output.dir={run_dir}", NO_REPORT]))
    record = json.loads((run_dir / "run.json").read_text())
    assert record["pixels"] == {"size": 28, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    from llmtune.inference.image_classifier import ImageClassifier

    classifier = ImageClassifier.load(run_dir)
    assert classifier.labels == [str(d) for d in range(10)] and classifier.spec.channels == 3
    assert len(classifier.predict([np.array(mnist[0]["image"], dtype=np.uint8)])) == 1
    if method == "full":
        plain = AutoModelForImageClassification.from_pretrained(run_dir)
        assert plain.config.num_hidden_layers == 1 and len(plain.vit.layers) == 1
        assert plain.config.num_labels == 10
    else:
        assert (run_dir / "adapter_model.safetensors").is_file()
