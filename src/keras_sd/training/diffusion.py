"""`DiffusionTrainer`: trains a text-conditioned latent-diffusion UNet (and text encoder).

One training example (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", alg. 1,
in the latent space of Rombach et al. 2022): encode the image with the frozen VAE encoder
(a posterior sample times the scaling factor), draw noise and a uniform timestep, noise the
latents with `scheduler.add_noise`, predict with the UNet from the text context and regress
`scheduler.training_target` (epsilon or v) with an MSE. A share `condition_dropout` of the
prompts is replaced by the empty prompt, so the same model also learns the unconditional
prediction that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2). With
`snr_gamma` each example's error is weighted by min(SNR(t), gamma) / SNR(t) (epsilon
targets; / (SNR(t) + 1) for v targets): the Min-SNR-gamma weighting of Hang et al. 2023,
the `--snr_gamma` of diffusers' training scripts, which the paper shows converges faster.

The trainer overrides `call` and `compute_loss` only, never `train_step`, so the built-in
`fit()` of every Keras backend (TensorFlow, JAX, PyTorch) trains it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_sd.training.base import Trainer
from keras_sd.training.vae import deserialize_component, sample_posterior, serialize_component


class DiffusionTrainer(Trainer):
    """Trains a `UNet` (and optionally the `CLIPTextEncoder`) with `fit()` on any backend.

    The VAE encoder is frozen (made non-trainable); the text encoder is trained only when
    `train_text_encoder` is True. Trained models need float32 variables: `compile` refuses
    float16/bfloat16 ones (load with `dtype="mixed_bfloat16"`, see `Trainer`).

    Args:
        text_encoder: a `CLIPTextEncoder` (token ids -> context).
        unet: a `UNet` whose `cross_attention_dim` is the text encoder's width.
        vae_encoder: a trained `VAEEncoder`, or None when training data are latents.
        scheduler: a keras-sd scheduler; its `prediction_type` picks the target.
        train_text_encoder: whether the text encoder's weights are updated.
        unconditional_token_ids: token ids [L] of the empty prompt (`tokenizer("")[0]`);
            required when `condition_dropout` > 0.
        condition_dropout: probability of replacing a prompt by the empty prompt.
        latent_scaling_factor: multiplies encoder samples (default: the VAE's own
            `scaling_factor`); ignored for "latents" inputs, which are already scaled.
        seed: seed of the noise, timesteps, posterior samples and dropout draws.
        snr_gamma: None for the plain MSE, or gamma > 0 of the Min-SNR-gamma loss weights
            (5.0 is the usual choice).
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Returns (call):
        `call({"images": [B, H, W, 3] in [-1, 1] or "latents": [B, h, w, C],
        "token_ids": int [B, L]})` -> dict with "prediction" and "target" [B, h, w, C].

    Example:
    >>> sd = StableDiffusion(64, 64, config="tiny")  # doctest: +SKIP
    >>> trainer = DiffusionTrainer(sd.text_encoder, sd.diffusion_model, sd.image_encoder,
    ...                            sd.scheduler, unconditional_token_ids=sd.tokenizer("")[0],
    ...                            )  # doctest: +SKIP
    >>> trainer.compile(optimizer=keras.optimizers.AdamW(1e-4))  # doctest: +SKIP
    >>> trainer.fit({"images": images, "token_ids": sd.tokenizer(captions)},
    ...             batch_size=32, epochs=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        text_encoder,
        unet,
        vae_encoder,
        scheduler,
        train_text_encoder: bool = True,
        unconditional_token_ids=None,
        condition_dropout: float = 0.1,
        latent_scaling_factor: float | None = None,
        seed: int | None = None,
        snr_gamma: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if snr_gamma is not None and not float(snr_gamma) > 0:
            raise ValueError(f"snr_gamma must be None or > 0; received {snr_gamma!r}.")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(
                f"condition_dropout must be in [0, 1]; received {condition_dropout!r}."
            )
        if condition_dropout > 0 and unconditional_token_ids is None:
            raise ValueError(
                "unconditional_token_ids (the empty prompt's ids, tokenizer('')[0]) are "
                f"required when condition_dropout > 0; condition_dropout={condition_dropout}."
            )
        if latent_scaling_factor is None and vae_encoder is not None:
            latent_scaling_factor = vae_encoder.scaling_factor
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae_encoder = vae_encoder
        if vae_encoder is not None:
            vae_encoder.trainable = False
        self.text_encoder.trainable = bool(train_text_encoder)
        self.scheduler = scheduler
        self.train_text_encoder = bool(train_text_encoder)
        self.unconditional_token_ids = (
            None
            if unconditional_token_ids is None
            else np.asarray(unconditional_token_ids, np.int32).reshape(-1)
        )
        self.condition_dropout = float(condition_dropout)
        self.latent_scaling_factor = (
            None if latent_scaling_factor is None else float(latent_scaling_factor)
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def encode_images(self, images):
        """Scaled latents: a posterior sample of the frozen VAE encoder times the scale."""
        if self.vae_encoder is None:
            raise ValueError("inputs have 'images' but the trainer has no vae_encoder.")
        moments = ops.stop_gradient(self.vae_encoder(images, training=False))
        noise = keras.random.normal(
            ops.shape(moments)[:-1] + (self.vae_encoder.latent_channels,),
            seed=self.seed_generator,
        )
        return sample_posterior(moments, noise) * self.latent_scaling_factor

    def drop_condition(self, token_ids):
        """Replace each row of `token_ids` [B, L] by the empty prompt with probability p."""
        if self.condition_dropout == 0.0:
            return token_ids
        batch = ops.shape(token_ids)[0]
        drop = keras.random.uniform((batch, 1), seed=self.seed_generator)
        uncond = ops.convert_to_tensor(self.unconditional_token_ids, "int32")[None]
        return ops.where(drop < self.condition_dropout, uncond, ops.cast(token_ids, "int32"))

    def predict_and_target(self, latents, token_ids, noise, timesteps, training=False):
        """The UNet prediction and its regression target for given noise and timesteps.

        The deterministic core of a training step (no dropout, no random draws).

        Args:
            latents: clean scaled latents [B, h, w, C].
            token_ids: int [B, L].
            noise: standard normal [B, h, w, C].
            timesteps: int [B] in [0, num_train_timesteps).
            training: passed to the models.

        Returns:
            (prediction, target), both [B, h, w, C].
        """
        context = self.text_encoder(token_ids, training=training)  # [B, L, D]
        if not self.train_text_encoder:
            context = ops.stop_gradient(context)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        noisy = ops.cast(noisy, self.unet.compute_dtype)
        prediction = self.unet(noisy, timesteps, context, training=training)
        return prediction, self.scheduler.training_target(latents, noise, timesteps)

    def call(self, inputs, training=False):
        if "latents" in inputs:
            latents = ops.cast(inputs["latents"], "float32")
        else:
            latents = self.encode_images(inputs["images"])
        batch = ops.shape(latents)[0]
        noise = keras.random.normal(ops.shape(latents), seed=self.seed_generator)
        timesteps = keras.random.randint(
            (batch,),
            0,
            self.scheduler.num_train_timesteps,
            dtype="int32",
            seed=self.seed_generator,
        )
        token_ids = inputs["token_ids"]
        if training:
            token_ids = self.drop_condition(token_ids)
        prediction, target = self.predict_and_target(latents, token_ids, noise, timesteps, training)
        outputs = {"prediction": prediction, "target": target}
        if self.snr_gamma is not None:
            outputs["loss_weight"] = self.loss_weights(timesteps)
        return outputs

    def loss_weights(self, timesteps):
        """Min-SNR-gamma weights [B] of int `timesteps` [B] (requires `snr_gamma`).

        SNR(t) = alpha_bar_t / (1 - alpha_bar_t); the weight is min(SNR, gamma) / SNR for
        epsilon targets and min(SNR, gamma) / (SNR + 1) for v targets.

        Example:
        >>> trainer = DiffusionTrainer(text, unet, None, DDIMScheduler(),
        ...                            condition_dropout=0.0, snr_gamma=5.0)  # doctest: +SKIP
        >>> trainer.loss_weights(keras.ops.array([0, 999]))  # doctest: +SKIP
        [0.0043, 1.0]
        """
        if self.snr_gamma is None:
            raise ValueError("loss_weights needs snr_gamma; this trainer has snr_gamma=None.")
        table = np.asarray(self.scheduler.alphas_cumprod, np.float64)
        snr = table / (1.0 - table)
        clipped = np.minimum(snr, self.snr_gamma)
        if self.scheduler.prediction_type == "v_prediction":
            weights = clipped / (snr + 1.0)
        else:
            weights = clipped / snr
        return ops.take(ops.convert_to_tensor(weights.astype(np.float32)), timesteps)

    @staticmethod
    def diffusion_loss(prediction, target, weights=None):
        """Mean squared error in float32 (the "simple" loss of Ho et al. 2020, eq. 14),
        each example's mean error times its weight when `weights` [B] are given."""
        error = ops.square(ops.cast(prediction, "float32") - ops.cast(target, "float32"))
        if weights is None:
            return ops.mean(error)
        per_example = ops.mean(ops.reshape(error, (ops.shape(error)[0], -1)), axis=1)
        return ops.mean(per_example * ops.cast(weights, "float32"))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.diffusion_loss(
            y_pred["prediction"], y_pred["target"], y_pred.get("loss_weight")
        )
        if self.losses:
            loss = loss + ops.sum(self.losses)
        return loss

    def get_config(self):
        serialize = serialize_component
        ids = self.unconditional_token_ids
        return {
            "name": self.name,
            "text_encoder": serialize(self.text_encoder),
            "unet": serialize(self.unet),
            "vae_encoder": None if self.vae_encoder is None else serialize(self.vae_encoder),
            "scheduler": serialize(self.scheduler),
            "train_text_encoder": self.train_text_encoder,
            "unconditional_token_ids": None if ids is None else ids.tolist(),
            "condition_dropout": self.condition_dropout,
            "latent_scaling_factor": self.latent_scaling_factor,
            "seed": self.seed,
            "snr_gamma": self.snr_gamma,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("text_encoder", "unet", "vae_encoder", "scheduler"):
            if config[key] is not None:
                config[key] = deserialize_component(config[key])
        return cls(**config)
