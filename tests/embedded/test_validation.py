"""TEI's request validation, pure: each refusal's kind, status and words."""

from __future__ import annotations

import pytest

from teisup.embedded import validation
from teisup.embedded.engine import ModelKind
from teisup.embedded.validation import ErrorKind, TeiError
from teisup.rpc import StatusCode


def refusal(check: object, *args: object) -> tuple[ErrorKind, StatusCode, str, bool]:
    with pytest.raises(TeiError) as caught:
        check(*args)  # type: ignore[operator]
    error = caught.value
    return error.kind, error.kind.code, error.message, error.counted


def test_kinds_answer_with_teis_status_codes_and_count_under_teis_labels() -> None:
    assert {kind: (kind.code, kind.metric) for kind in ErrorKind} == {
        ErrorKind.EMPTY: (StatusCode.INVALID_ARGUMENT, "validation"),
        ErrorKind.VALIDATION: (StatusCode.INVALID_ARGUMENT, "validation"),
        ErrorKind.BATCH_SIZE: (StatusCode.INVALID_ARGUMENT, "batch_size"),
        ErrorKind.TOKENIZER: (StatusCode.FAILED_PRECONDITION, "tokenization"),
        ErrorKind.MODEL_TYPE: (StatusCode.FAILED_PRECONDITION, "model_type"),
        ErrorKind.OVERLOADED: (StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
        ErrorKind.BACKEND: (StatusCode.FAILED_PRECONDITION, None),
    }
    assert not TeiError(ErrorKind.BACKEND, "x").counted  # no label, nothing to count


def test_inputs_empty_too_long_or_cut() -> None:
    assert refusal(validation.check_input, "", None, 4, False) == (
        ErrorKind.EMPTY,
        StatusCode.INVALID_ARGUMENT,
        "Input validation error: `inputs` cannot be empty",
        True,
    )
    assert refusal(validation.check_input, "x" * 1001, None, 4, False)[2] == (
        "Input validation error: `inputs` must have less than 1000 characters. Given: 1001"
    )
    assert validation.check_input("x" * 1001, "y" * 5, 4, True) == ("x" * 1000, "y" * 5, 1006)
    assert validation.check_input("", "pair", 4, False) == ("", "pair", 4)


def test_tokens_over_the_limit_are_cut_or_refused() -> None:
    assert validation.check_tokens(4, 4, False) is False
    assert validation.check_tokens(5, 4, True) is True
    assert refusal(validation.check_tokens, 5, 4, False)[2] == (
        "Input validation error: `inputs` must have less than 4 tokens. Given: 5"
    )


def test_prompts_dimensions_pairs_and_batches() -> None:
    prompts = {"query": "q: "}
    assert validation.prompt_prefix(prompts, "query", "d: ") == "q: "
    assert validation.prompt_prefix(prompts, None, "d: ") == "d: "
    assert validation.prompt_prefix(prompts, None, None) == ""
    assert refusal(validation.prompt_prefix, prompts, "nope", None)[0] is ErrorKind.VALIDATION
    assert refusal(validation.check_dimensions, 0, 384)[2].endswith("should be positive")
    assert refusal(validation.check_dimensions, 385, 384)[0] is ErrorKind.VALIDATION
    validation.check_dimensions(384, 384)
    assert validation.check_pair(["a"]) == ("a", None)
    assert validation.check_pair(["a", "b"]) == ("a", "b")
    assert refusal(validation.check_pair, ["a", "b", "c"])[2] == (
        "`inputs` must have a single or two elements. Given: 3"
    )
    assert refusal(validation.check_rerank_texts, [], 4)[:3] == (
        ErrorKind.EMPTY,
        StatusCode.INVALID_ARGUMENT,
        "`texts` cannot be empty",
    )
    assert refusal(validation.check_rerank_texts, ["t"] * 5, 4)[:3] == (
        ErrorKind.BATCH_SIZE,
        StatusCode.INVALID_ARGUMENT,
        "batch size 5 > maximum allowed batch size 4",
    )
    assert refusal(validation.check_ids, [])[3] is False  # TEI does not count it


@pytest.mark.parametrize(
    ("check", "args", "message"),
    [
        (validation.check_embed, (ModelKind.RERANKER, False, False), "Model is not an embedding"),
        (validation.check_embed, (ModelKind.EMBEDDING, True, True), "`normalize` is not available"),
        (validation.check_embed_sparse, (ModelKind.EMBEDDING, False), "with SPLADE pooling"),
        (validation.check_embed_all, (ModelKind.EMBEDDING, True), "`embed_all` is not available"),
        (validation.check_classifier, (ModelKind.EMBEDDING,), "not a classifier model"),
        (validation.check_reranker, (ModelKind.EMBEDDING,), "not a classifier model"),
        (validation.check_reranker, (ModelKind.CLASSIFIER,), "not a re-ranker model"),
    ],
)
def test_an_rpc_the_model_cannot_serve_is_model_type(
    check: object, args: tuple[object, ...], message: str
) -> None:
    kind, code, text, counted = refusal(check, *args)
    assert (kind, code, counted) == (ErrorKind.MODEL_TYPE, StatusCode.FAILED_PRECONDITION, True)
    assert message in text


def test_what_each_model_serves_passes() -> None:
    validation.check_embed(ModelKind.EMBEDDING, False, True)
    validation.check_embed(ModelKind.EMBEDDING, True, False)
    validation.check_embed_sparse(ModelKind.EMBEDDING, True)
    validation.check_embed_all(ModelKind.EMBEDDING, False)
    validation.check_classifier(ModelKind.CLASSIFIER)
    validation.check_reranker(ModelKind.RERANKER)
