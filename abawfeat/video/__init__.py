"""Raw video in: face detection with landmarks (MTCNN), alignment, tracking, and the crop loop that writes
the release layout (docs/video.md)."""
