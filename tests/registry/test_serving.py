"""The pyfunc class served for every adapter version: what MLflow makes of its `predict`."""

from __future__ import annotations

import warnings

import pandas as pd

from loraflow.registry.serving import AdapterModel, _prompts


def test_mlflow_loads_the_model_class_without_a_warning_and_keeps_the_logged_signature():
    """MLflow inspects `predict`'s hints on every load: no schema of its own (None), and nothing printed."""
    from mlflow.pyfunc.utils.data_validation import _get_func_info_if_type_hint_supported

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _get_func_info_if_type_hint_supported(AdapterModel.predict)
    assert info is None  # the signature logged with the version (with its max_new_tokens param) rules
    assert [str(w.message) for w in caught] == []


def test_prompts_from_what_mlflow_hands_over_and_from_direct_calls():
    assert _prompts(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert _prompts(pd.DataFrame({0: ["a"]})) == ["a"]  # a list after MLflow's schema enforcement
    assert _prompts(["a", "b"]) == ["a", "b"]
    assert _prompts("a") == ["a"]
