"""Named training recipes: each preset's hyper-parameters and its Keras model factory."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from digitserve.trainer.errors import TrainerError

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class Preset:
    """The hyper-parameters of one training recipe (all recorded in the model's metadata)."""

    name: str  # as given to ``mnist-train train --preset``
    description: str  # one line for ``--help`` and the metadata
    # ``mlp`` (``hidden_layers`` dense layers), ``small-cnn`` (two convolutions) or ``cnn`` (two convolution
    # blocks with batch normalisation, dropout and augmentation).
    architecture: str
    optimizer: str  # ``sgd`` or ``adam``
    learning_rate: float  # initial
    lr_schedule: str  # ``constant``, or ``cosine`` (to ``lr_final_fraction`` of it over all the steps)
    epochs: int
    batch_size: int
    loss: str = "categorical_crossentropy"  # on one-hot labels (scikit-learn's OneHotEncoder)
    # Share of the training images set aside by ``train_test_split`` for the hold-out accuracy (the
    # tutorial's 75/25 split); 0 trains on all of them.
    holdout_fraction: float = 0.0
    lr_final_fraction: float = 0.0
    hidden_units: int = 128  # of the dense hidden layer (``mlp``: of each of them)
    hidden_layers: int = 1  # ``mlp`` only: how many Dense(hidden_units, relu) layers (mnist-train sweep)
    dropout: float = 0.0  # before the output layer (for ``cnn``, a quarter less after each block)
    feature_dropout: float = 0.0  # ``small-cnn`` only: on the flattened convolution features
    conv1_filters: int = 32  # ``small-cnn`` only: of its first convolution
    conv2_filters: int = 64  # ``small-cnn`` only: of its second
    batch_norm: bool = False  # ``small-cnn`` only: batch normalisation after each pooling
    augment_translation: float = 0.0  # random shift, a fraction of height and width, training only
    augment_rotation: float = 0.0  # random rotation, a fraction of a full turn, training only

    def with_overrides(self, *, epochs: int | None = None, batch_size: int | None = None) -> Preset:
        """This preset with the epochs and/or batch size replaced (``None`` keeps the preset's)."""
        if epochs is not None and epochs < 1:
            raise TrainerError(f"epochs must be at least 1, got {epochs}")
        if batch_size is not None and batch_size < 1:
            raise TrainerError(f"batch size must be at least 1, got {batch_size}")
        return dataclasses.replace(self, epochs=self.epochs if epochs is None else epochs,
                                   batch_size=self.batch_size if batch_size is None else batch_size)

    def hyperparameters(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset(name="seed", description="the tutorial: Dense(128, relu) -> Dense(10, softmax), SGD, 20 epochs, "
           "75/25 split of the training images", architecture="mlp", optimizer="sgd",
           learning_rate=0.01,  # Keras' default for the tutorial's compile(optimizer='sgd')
           lr_schedule="constant", epochs=20, batch_size=128, holdout_fraction=0.25),
    Preset(name="default", description="a small two-convolution network (16 and 48 filters) with batch "
           "normalisation, dropout and light shift augmentation, Adam with cosine decay, 4 epochs, "
           "90/10 split", architecture="small-cnn", optimizer="adam", learning_rate=3e-3,
           lr_schedule="cosine", lr_final_fraction=0.02, epochs=4, batch_size=128, holdout_fraction=0.1,
           conv1_filters=16, conv2_filters=48, batch_norm=True, dropout=0.4, feature_dropout=0.25,
           augment_translation=0.06),
    Preset(name="cnn", description="two convolution blocks with batch normalisation and dropout, light "
           "augmentation, Adam with cosine decay, 15 epochs, 95/5 split", architecture="cnn",
           optimizer="adam",
           learning_rate=2e-3, lr_schedule="cosine", lr_final_fraction=0.01, epochs=15, batch_size=128,
           holdout_fraction=0.05, hidden_units=256, dropout=0.4, augment_translation=0.08,
           augment_rotation=0.03),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; TrainerError if there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        raise TrainerError(f"unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


def build_model(preset: str | Preset, input_shape: Sequence[int] = (28, 28), num_classes: int = 10
                ) -> keras.Model:
    """The preset's uncompiled model. It takes the flat input (``prod(input_shape)`` floats in
    [0, 1]) and ends in a softmax over ``num_classes``; it uses only built-in layers, so the saved
    ``model.keras`` loads with ``safe_mode=True``."""
    import keras
    from keras import layers

    if isinstance(preset, str):
        preset = get_preset(preset)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise TrainerError(f"input shape must be (rows, cols) or (rows, cols, channels): {shape}")
    if num_classes < 2:
        raise TrainerError(f"need at least 2 classes, got {num_classes}")
    input_size = math.prod(shape)
    image_shape = shape if len(shape) == 3 else (*shape, 1)

    inputs = keras.Input(shape=(input_size,), name="pixels")
    if preset.architecture == "mlp":
        if preset.hidden_layers < 1:
            raise TrainerError(f"preset {preset.name!r} needs at least 1 hidden layer, "
                               f"got {preset.hidden_layers}")
        # The first keeps the name "hidden" of the one-layer models published before.
        x = inputs
        for layer in range(1, preset.hidden_layers + 1):
            name = "hidden" if layer == 1 else f"hidden{layer}"
            x = layers.Dense(preset.hidden_units, activation="relu", name=name)(x)
    elif preset.architecture == "small-cnn":
        x = layers.Reshape(image_shape, name="image")(inputs)
        if preset.augment_translation > 0:  # identity outside training
            t = preset.augment_translation
            x = layers.RandomTranslation(t, t, fill_mode="constant", name="shift")(x)
        for index, filters in enumerate((preset.conv1_filters, preset.conv2_filters), start=1):
            x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
            x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
            if preset.batch_norm:
                # Moving statistics that follow the weights within ~10 steps (Keras' default, 0.99,
                # lags ~100): a one-epoch run reached 95.6 % test accuracy with it, 98.7 % with 0.9.
                x = layers.BatchNormalization(momentum=0.9, name=f"pool{index}_bn")(x)
        x = layers.Flatten(name="flatten")(x)
        if preset.feature_dropout > 0:
            x = layers.Dropout(preset.feature_dropout, name="feature_dropout")(x)
        x = layers.Dense(preset.hidden_units, activation="relu", name="hidden")(x)
    elif preset.architecture == "cnn":
        x = layers.Reshape(image_shape, name="image")(inputs)
        # Augmentation layers are identity functions outside training.
        if preset.augment_translation > 0:
            t = preset.augment_translation
            x = layers.RandomTranslation(t, t, fill_mode="constant", name="shift")(x)
        if preset.augment_rotation > 0:
            x = layers.RandomRotation(preset.augment_rotation, fill_mode="constant", name="rotate")(x)
        for block, filters in enumerate((32, 64), start=1):
            for conv in (1, 2):
                name = f"block{block}_conv{conv}"
                x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
                x = layers.BatchNormalization(name=f"{name}_bn")(x)
                x = layers.Activation("relu", name=f"{name}_relu")(x)
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
            x = layers.Dropout(preset.dropout * 0.75, name=f"block{block}_dropout")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(preset.hidden_units, use_bias=False, name="hidden")(x)
        x = layers.BatchNormalization(name="hidden_bn")(x)
        x = layers.Activation("relu", name="hidden_relu")(x)
    else:
        raise TrainerError(f"preset {preset.name!r} has unknown architecture {preset.architecture!r}")
    if preset.dropout > 0:
        x = layers.Dropout(preset.dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"mnist_{preset.name.replace('-', '_')}")


def build_optimizer(preset: Preset, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The preset's optimizer, its learning-rate schedule spread over ``epochs`` epochs of
    ``steps_per_epoch`` batches."""
    import keras

    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule
    if preset.lr_schedule == "constant":
        learning_rate = preset.learning_rate
    elif preset.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            preset.learning_rate, decay_steps=max(1, steps_per_epoch * preset.epochs),
            alpha=preset.lr_final_fraction)
    else:
        raise TrainerError(f"preset {preset.name!r} has unknown schedule {preset.lr_schedule!r}")
    optimizers = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    if preset.optimizer not in optimizers:
        raise TrainerError(f"preset {preset.name!r} has unknown optimizer {preset.optimizer!r}")
    return optimizers[preset.optimizer](learning_rate=learning_rate)


# The grid ``mnist-train sweep`` trains the seed preset over: hidden units per layer × hidden layers.
SWEEP_UNITS = (16, 32, 64, 128, 256, 512)
SWEEP_LAYERS = (1, 2, 3)
