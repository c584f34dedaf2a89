"""BYTES tensors end to end: tritonclient sends strings (binary and JSON) to a string ONNX
model and a scikit-learn text pipeline built here, and gets them back with their shapes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http.aio as triton_aio
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from tests.proxy.support import serve


def string_model(directory: Path) -> None:
    """directory/model.onnx and model.yaml: `echo` = text, `is_zero` = (text == "0"), for
    a string tensor `text` of shape [-1, 2] (ONNX Equal takes strings from opset 19)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["text"], ["echo"]),
            helper.make_node("Equal", ["text", "zero"], ["is_zero"]),
        ],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None, 2])],
        [
            helper.make_tensor_value_info("echo", TensorProto.STRING, [None, 2]),
            helper.make_tensor_value_info("is_zero", TensorProto.BOOL, [None, 2]),
        ],
        [numpy_helper.from_array(np.array(["0"], dtype=object), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    directory.mkdir(parents=True)
    raw = model.SerializeToString()
    (directory / "model.onnx").write_bytes(raw)
    (directory / "model.yaml").write_text(
        "name: strings\nversion: '1'\nframework: onnx\nartifact: model.onnx\n"
        f"sha256: {hashlib.sha256(raw).hexdigest()}\nstage: production\n"
        "inputs: [{name: text, datatype: BYTES, shape: [-1, 2]}]\n"
        "outputs: [{name: echo, datatype: BYTES, shape: [-1, 2]},\n"
        "          {name: is_zero, datatype: BOOL, shape: [-1, 2]}]\n"
    )


TEXT = np.array([["0", "b"], ["héllo", "0"], ["", "b'0'"]], dtype=object)


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
async def test_strings_reach_the_model_as_strings_and_keep_their_shape(
    tmp_path: Path, binary_in: bool, binary_out: bool
) -> None:
    registry = tmp_path / "registry"
    string_model(registry / "strings" / "1")
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            text = InferInput("text", list(TEXT.shape), "BYTES")
            text.set_data_from_numpy(TEXT, binary_data=binary_in)
            outputs = [
                InferRequestedOutput("echo", binary_data=binary_out),
                InferRequestedOutput("is_zero", binary_data=binary_out),
            ]
            result = await client.infer("strings", [text], outputs=outputs)
            echo = result.as_numpy("echo")
            assert echo is not None and echo.shape == TEXT.shape
            # tritonclient gives BYTES back as bytes (binary) or str (JSON), as it does
            # against Triton; either way the text is what was sent.
            as_text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in echo]
            assert as_text == TEXT.tolist()
            is_zero = result.as_numpy("is_zero")
            assert is_zero is not None
            np.testing.assert_array_equal(is_zero, TEXT == "0")  # "b'0'" is not "0"
        finally:
            await client.close()


async def test_a_bytes_input_that_is_not_utf8_is_a_400_for_a_string_model(
    tmp_path: Path,
) -> None:
    registry = tmp_path / "registry"
    string_model(registry / "strings" / "1")
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            text = InferInput("text", [1, 2], "BYTES")
            text.set_data_from_numpy(np.array([[b"\xff\xfe", b"ok"]], dtype=object))
            with pytest.raises(InferenceServerException, match="not UTF-8") as caught:
                await client.infer("strings", [text])
            assert caught.value.status() == "400"
            wrong_shape = InferInput("text", [4], "BYTES")  # shape kept: checked, refused
            wrong_shape.set_data_from_numpy(np.array(["a", "b", "c", "d"], dtype=object))
            with pytest.raises(InferenceServerException, match=r"shape \[4\]"):
                await client.infer("strings", [wrong_shape])
        finally:
            await client.close()
        assert server.gateway.windows.get("strings", "1").errors == 0


CORPUS = [  # a tiny sentiment corpus: enough for a CountVectorizer + LogisticRegression
    ("a wonderful, warm film", "pos"),
    ("great acting and a great story", "pos"),
    ("héllo sunshine, what a delight", "pos"),
    ("lovely music and lovely people", "pos"),
    ("I enjoyed every wonderful minute", "pos"),
    ("dull, slow and far too long", "neg"),
    ("a terrible story, badly acted", "neg"),
    ("boring and dull from start to end", "neg"),
    ("awful music and a terrible ending", "neg"),
    ("I wanted my evening back: boring", "neg"),
]


def text_model(directory: Path) -> Any:
    """directory/model.joblib and model.yaml: documents (BYTES, shape [-1]) → a class name
    (`label`, BYTES) and class probabilities; returns the fitted pipeline."""
    import joblib
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts, labels = zip(*CORPUS, strict=True)
    pipeline = make_pipeline(CountVectorizer(), LogisticRegression(C=10.0))
    pipeline.fit(list(texts), list(labels))
    directory.mkdir(parents=True)
    joblib.dump(pipeline, directory / "model.joblib")
    digest = hashlib.sha256((directory / "model.joblib").read_bytes()).hexdigest()
    (directory / "model.yaml").write_text(
        "name: reviews\nversion: '1'\nframework: sklearn\nartifact: model.joblib\n"
        f"sha256: {digest}\nstage: production\n"
        "inputs: [{name: text, datatype: BYTES, shape: [-1]}]\n"
        "outputs: [{name: label, datatype: BYTES, shape: [-1]},\n"
        "          {name: probabilities, datatype: FP32, shape: [-1, 2]}]\n"
    )
    return pipeline


REVIEWS = np.array(
    ["what a wonderful story", "boring, dull, terrible", "héllo lovely music", "b'0'"],
    dtype=object,
)


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
async def test_a_scikit_learn_text_pipeline_gets_its_documents_as_str(
    tmp_path: Path, binary_in: bool
) -> None:
    """A text pipeline takes its documents as a 1-D BYTES batch (shape [-1]), handed over
    as str; the answers are the pipeline's own, non-ASCII text included."""
    registry = tmp_path / "registry"
    pipeline = text_model(registry / "reviews" / "1")
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            text = InferInput("text", [len(REVIEWS)], "BYTES")
            text.set_data_from_numpy(REVIEWS, binary_data=binary_in)
            outputs = [
                InferRequestedOutput("label", binary_data=False),
                InferRequestedOutput("probabilities", binary_data=False),
            ]
            result = await client.infer("reviews", [text], outputs=outputs)
            label, proba = result.as_numpy("label"), result.as_numpy("probabilities")
            assert label is not None and proba is not None
            assert [str(v) for v in label] == pipeline.predict(list(REVIEWS)).tolist()
            assert label.tolist()[:3] == ["pos", "neg", "pos"]
            np.testing.assert_allclose(proba, pipeline.predict_proba(list(REVIEWS)), rtol=1e-6)
        finally:
            await client.close()
        assert server.gateway.windows.get("reviews", "1").errors == 0


def category_model(directory: Path) -> Any:
    """directory/model.joblib and model.yaml: (colour, size) as BYTES [-1, 2] → a class name,
    through a OneHotEncoder that ignores categories it never saw."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    seen = np.array([["red", "small"], ["red", "large"], ["blue", "small"], ["blue", "large"]])
    pipeline = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression(C=10.0))
    pipeline.fit(seen.astype(object), ["warm", "warm", "cold", "cold"])
    directory.mkdir(parents=True)
    joblib.dump(pipeline, directory / "model.joblib")
    digest = hashlib.sha256((directory / "model.joblib").read_bytes()).hexdigest()
    (directory / "model.yaml").write_text(
        "name: colours\nversion: '1'\nframework: sklearn\nartifact: model.joblib\n"
        f"sha256: {digest}\nstage: production\n"
        "inputs: [{name: item, datatype: BYTES, shape: [-1, 2]}]\n"
        "outputs: [{name: label, datatype: BYTES, shape: [-1]}]\n"
    )
    return pipeline


async def test_categories_reach_a_scikit_learn_model_as_the_str_it_learnt(
    tmp_path: Path,
) -> None:
    """As bytes, b"blue" is a category the encoder never saw: ignored, every row would be
    answered "warm" with a 200. As str, "blue" is blue."""
    registry = tmp_path / "registry"
    category_model(registry / "colours" / "1")
    items = np.array([["blue", "small"], ["red", "large"], ["blue", "large"]], dtype=object)
    async with serve(tmp_path, registry) as server:
        client = triton_aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            item = InferInput("item", list(items.shape), "BYTES")
            item.set_data_from_numpy(items, binary_data=True)
            outputs = [InferRequestedOutput("label", binary_data=False)]
            result = await client.infer("colours", [item], outputs=outputs)
            label = result.as_numpy("label")
            assert label is not None and label.tolist() == ["cold", "warm", "cold"]
        finally:
            await client.close()
