"""Textual-inversion tokens on a pipeline: add them, save and load their embeddings.

A textual-inversion concept is a new token whose embedding row (or N rows, one per vector)
is learned while the model stays frozen (Gal et al. 2022, "An Image is Worth One Word",
https://arxiv.org/abs/2208.01618). `StableDiffusion` inherits these methods; the tokenizer
and the text encoder's token table always grow together, and only the text encoder's
compiled program is refreshed.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_sd.weights import embeddings


def _check_token(token) -> None:
    if not isinstance(token, str) or not token:
        raise ValueError(f"token must be a non-empty string; received {token!r}.")
    if any(c.isspace() for c in token):
        raise ValueError(
            f"token={token!r} contains whitespace; use one word such as '<my-thing>' "
            "(a prompt would split it into several tokens)."
        )


class TextualInversionMixin:
    """`add_tokens`, `save_textual_inversion` and `load_textual_inversion` for a pipeline
    with `tokenizer`, `text_encoder` and a `_compiled` program cache.

    Example:
    >>> from keras_sd import StableDiffusion
    >>> issubclass(StableDiffusion, TextualInversionMixin)
    True
    >>> sd = StableDiffusion(64, 64, config="tiny")
    >>> sd.add_tokens("<toy>", initializer_token="circle")
    [49408]
    >>> sd.text_encoder.token_embedding.embeddings.shape[0] == sd.tokenizer.vocab_size
    True
    """

    def _token_table(self) -> np.ndarray:
        """The text encoder's token-embedding table as float32 numpy [V, D]."""
        table = self.text_encoder.token_embedding.embeddings
        return np.asarray(ops.convert_to_numpy(ops.cast(table, "float32")))

    def token_vectors(self, token: str) -> np.ndarray:
        """The embedding rows [N, D] (float32) that an added token stands for.

        Example:
        >>> from keras_sd import StableDiffusion
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.add_tokens("<s1>", initializer_token="circle", num_vectors=2)
        [49408, 49409]
        >>> sd.token_vectors("<s1>").shape
        (2, 32)
        """
        if token not in self.tokenizer.added_tokens:
            raise ValueError(
                f"token={token!r} is not an added token; added: {self.tokenizer.added_tokens}."
            )
        return self._token_table()[self.tokenizer.encode(token)[1:-1]]

    def add_tokens(
        self,
        token: str,
        initializer_token: str | None = None,
        num_vectors: int = 1,
        vectors=None,
        seed: int | None = None,
    ) -> list[int]:
        """Add a placeholder token to the tokenizer and rows to the text encoder's table.

        The new rows start as `vectors` if given, else as the embedding of
        `initializer_token` (each of the `num_vectors` rows), else as a seeded normal draw
        with the table's standard deviation. A multi-vector token `t` adds `t`, `t_1`, ...
        and `t` in a prompt expands to all of them, as diffusers and AUTOMATIC1111 do.

        Args:
            token: one word, e.g. "<cat-toy>" (angle brackets are a convention, not
                required); whitespace is refused, and so is a word already in the vocabulary.
            initializer_token: a word that is a single vocabulary token, e.g. "toy".
            num_vectors: rows of the concept (>= 1); ignored when `vectors` is given.
            vectors: float array [N, D] of the rows.
            seed: seed of the random draw when neither `vectors` nor `initializer_token`.

        Returns:
            The new token ids.

        Example:
        >>> from keras_sd import StableDiffusion
        >>> sd = StableDiffusion(64, 64, config="tiny")
        >>> sd.add_tokens("<s1>", initializer_token="circle")
        [49408]
        >>> sd.text_to_image("a red <s1> on a blue background", num_steps=2, seed=0).shape
        (1, 64, 64, 3)
        """
        _check_token(token)
        if isinstance(num_vectors, bool) or not isinstance(num_vectors, int) or num_vectors < 1:
            raise ValueError(f"num_vectors must be an int >= 1; received {num_vectors!r}.")
        encoder, tokenizer = self.text_encoder, self.tokenizer
        table = self._token_table()
        if tokenizer.vocab_size != len(table):
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the text encoder's table "
                f"{len(table)} rows; they must match before tokens are added."
            )
        if vectors is not None:
            rows = np.asarray(vectors, np.float32)
            rows = rows[None] if rows.ndim == 1 else rows
            if rows.ndim != 2 or rows.shape[1] != encoder.hidden_dim:
                raise ValueError(
                    f"vectors for {token!r} have width {rows.shape[-1]} (shape {rows.shape}) "
                    f"but this text encoder's embeddings have {encoder.hidden_dim}: the "
                    "embedding was made for another model (768: SD 1.x, 1024: SD 2.x)."
                )
            num_vectors = len(rows)
        elif initializer_token is not None:
            rows = np.repeat(table[self._initializer_id(initializer_token)], num_vectors, axis=0)
        else:
            rng = np.random.default_rng(seed)
            rows = rng.normal(0.0, table.std(), (num_vectors, table.shape[1]))
        new_ids = tokenizer.add_tokens(token, num_vectors=num_vectors)
        grown = encoder.grow_token_embedding(rows.astype(np.float32))
        if grown != new_ids:  # unreachable while the sizes matched above; keeps them paired
            raise RuntimeError(f"token ids {new_ids} and table rows {grown} differ")
        self._compiled.pop("text_encoder", None)  # its weights changed shape
        # Saved checkpoints describe the model by this config: it must list the grown table.
        self.config["text_encoder"]["vocab_size"] = encoder.vocab_size
        return new_ids

    def _initializer_id(self, initializer_token) -> list[int]:
        """[id] of a one-token initializer word; a clear error naming its tokens otherwise."""
        if not isinstance(initializer_token, str):
            raise ValueError(f"initializer_token must be a str; received {initializer_token!r}.")
        ids = self.tokenizer.encode(initializer_token)[1:-1]
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"initializer_token={initializer_token!r} must be one vocabulary token; it "
                f"is {len(ids)} tokens {pieces}: pick one word such as 'toy'."
            )
        return ids

    def set_token_vectors(self, token: str, vectors) -> None:
        """Overwrite the rows [N, D] of an added token (the text encoder's variable is kept).

        Example:
        >>> sd.set_token_vectors("<s1>", np.zeros((1, 768)))  # doctest: +SKIP
        """
        ids = self.tokenizer.encode(token)[1:-1]
        rows = np.asarray(vectors, np.float32).reshape(len(ids), -1)
        variable = self.text_encoder.token_embedding.embeddings
        table = self._token_table()
        table[ids] = rows
        variable.assign(table.astype(variable.dtype))

    def save_textual_inversion(self, path, token: str, layout: str = "diffusers") -> None:
        """Write an added token's rows as a `.safetensors` embedding file.

        Args:
            path: the file, e.g. "learned_embeds.safetensors".
            token: an added token.
            layout: "diffusers" (`{token: [N, D]}`, diffusers' `learned_embeds`) or
                "a1111" (`{"emb_params": [N, D]}`; AUTOMATIC1111 names the token after the
                file's stem).

        Example:
        >>> sd.save_textual_inversion("learned_embeds.safetensors", "<s1>")  # doctest: +SKIP
        """
        embeddings.write_embedding(path, token, self.token_vectors(token), layout=layout)

    def load_textual_inversion(self, path, token: str | None = None) -> list[int]:
        """Add the token of a diffusers or AUTOMATIC1111 embedding file.

        Reads diffusers' `learned_embeds.safetensors`/`.bin` and AUTOMATIC1111's
        `.pt`/`.safetensors` (one or several vectors) without running pickle code.

        Args:
            path: the embedding file.
            token: the token to use in prompts; None takes the file's own (diffusers:
                its key; AUTOMATIC1111: its name, else the file's stem).

        Returns:
            The new token ids.

        Raises:
            ValueError: the file holds no embedding, its width is not this text
                encoder's, or the token is already in the vocabulary.

        Example:
        >>> sd = StableDiffusion.from_preset("tiny-shapes")  # doctest: +SKIP
        >>> sd.load_textual_inversion("learned_embeds.safetensors")  # doctest: +SKIP
        >>> sd.text_to_image("a yellow <s1> on a black background")  # doctest: +SKIP
        """
        stored, vectors = embeddings.read_embedding(path)
        token = stored if token is None else token
        return self.add_tokens(token, vectors=np.asarray(vectors, np.float32))


__all__ = ["TextualInversionMixin"]
