"""Conversion of models made elsewhere (TFLite, ONNX QDQ) into ternet model files.

Needs the optional `convert` extra; nothing here is imported by `import ternet`.
"""
