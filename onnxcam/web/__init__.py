"""The static page of ``onnxcam export --web`` (index.html, onnxcam-web.js): package data."""
