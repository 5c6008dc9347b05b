"""The paper's algorithm as pure functions: arrays in, arrays out.

Nothing in this package imports Ray, fsspec or pyarrow or touches files; every tensor function
follows the device of its inputs.
"""
