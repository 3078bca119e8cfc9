"""The compute dtypes and the device/dtype rules, in one table (no MindSpore import at module level,
so config validation reads it for free). Config keys name dtypes "fp32" / "fp16" / "bf16"; networks
take the MindSpore dtype (`ms_dtype`). `device_dtype_problem` is the one statement of what each
device can run, used by `latte train`, `latte sample` and `latte ingest` validation and by Latte.
"""
DTYPE_NAMES = ("fp32", "fp16", "bf16")
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # bf16: stored, numpy lacks it


def _table():
    import mindspore as ms

    return {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def ms_dtype(name):
    """The MindSpore dtype of "fp32" / "fp16" / "bf16" (a MindSpore dtype is returned as it is)."""
    table = _table()
    if not isinstance(name, str):
        if name not in table.values():
            raise ValueError(f"dtype={name} is not supported: use mindspore.float32, float16 or bfloat16")
        return name
    if name not in table:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return table[name]


def device_dtype_problem(device_target, dtype="fp32", flash_attention=False, key="dtype"):
    """One line saying why `dtype` (a name or a MindSpore dtype) and flash attention cannot run on
    `device_target`, or None. `key` names the config key in the message."""
    if not isinstance(dtype, str):
        dtype = next(name for name, value in _table().items() if value == ms_dtype(dtype))
    if dtype == "bf16" and device_target == "CPU":
        return (f"{key} bf16 is not supported on CPU (no bf16 matmul kernels): use {key} fp32 on CPU, "
                "or device_target Ascend/GPU")
    if flash_attention and device_target != "Ascend":
        return (f"enable_flash_attention needs device_target Ascend, not {device_target}: "
                "set --enable_flash_attention False")
    if flash_attention and dtype == "fp32":
        return "enable_flash_attention needs dtype fp16 or bf16, not fp32"
    return None
