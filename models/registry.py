"""The Latte variants, as data: names, sizes, the constructor kwargs for a latent shape, and how to
recognise a variant from a saved config. No MindSpore import, so config validation reads it for free.

Every place that knows a variant reads it here: the config choices of `latte train` / `latte sample`,
the trainer and the sampler (kwargs from a latent shape), `latte convert` (heads from the hidden size,
the variant name of an inferred config) and `models.latte.LATTE_MODELS` (the constructors).
"""

# size letter -> (depth, hidden_size, num_heads), the original registry's (Latte-XL/2 is the paper's).
SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
PATCH_SIZES = (2, 4, 8)
MLP_RATIO = 4.0
MODEL_NAMES = tuple(f"Latte-{size}/{patch}" for size in SIZES for patch in PATCH_SIZES)


def variant_sizes(name):
    """{"depth", "hidden_size", "num_heads", "patch_size"} of a variant name such as "Latte-XL/2"."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown Latte variant {name!r}: use one of {', '.join(MODEL_NAMES)}")
    size, patch = name[len("Latte-"):].split("/")
    depth, hidden, heads = SIZES[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))


def latte_kwargs(name, latent_shape, num_frames, learn_sigma=True, num_classes=0, class_dropout_prob=None,
                 hidden_size=0, depth=0, num_heads=0):
    """Latte(**kwargs) of variant `name` for latents of shape (C, h, w), in the format `latte convert`
    and the trainer store in a checkpoint. hidden_size / depth / num_heads override the variant's (0:
    keep); class_dropout_prob is stored only when given (a trained model's value)."""
    sizes = variant_sizes(name)
    config = dict(input_size=int(latent_shape[1]), patch_size=sizes["patch_size"], in_channels=int(latent_shape[0]),
                  hidden_size=hidden_size or sizes["hidden_size"], depth=depth or sizes["depth"],
                  num_heads=num_heads or sizes["num_heads"], mlp_ratio=MLP_RATIO, num_frames=int(num_frames),
                  learn_sigma=bool(learn_sigma), extras=1)
    if num_classes:
        config.update(extras=2, num_classes=int(num_classes))
        if class_dropout_prob is not None:
            config["class_dropout_prob"] = class_dropout_prob
    return config


def variant_of(config):
    """The variant name ("Latte-XL/2") of a Latte kwargs dict, or None for a custom size."""
    for size, (depth, hidden, heads) in SIZES.items():
        if ((config.get("depth"), config.get("hidden_size"), config.get("num_heads")) == (depth, hidden, heads)
                and config.get("mlp_ratio", MLP_RATIO) == MLP_RATIO and config.get("patch_size") in PATCH_SIZES):
            return f"Latte-{size}/{config['patch_size']}"
    return None


def same_architecture(name, config):
    """Whether variant `name` has the depth, width, heads and patch size of a Latte kwargs dict."""
    sizes = variant_sizes(name)
    return all(config.get(key) == value for key, value in sizes.items())


def heads_for_hidden(hidden_size):
    """The heads of the variant with this width (the head count is visible in no weight shape), or None."""
    return next((heads for _, hidden, heads in SIZES.values() if hidden == hidden_size), None)
