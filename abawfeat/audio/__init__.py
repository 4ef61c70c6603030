"""The audio modality of stage one: speech-encoder features per crop frame, cached like the face features.

    sources.py   finding each video's source file (.mp4/.avi) in the release tree
    decode.py    PyAV: frame timestamps from the container, audio as 16 kHz mono float32 blocks
    stream.py    segment-by-segment encoding in bounded memory; pooling the 50 Hz outputs per frame
    extract.py   run_audio_extraction(config): the loop behind
                 `abawfeat extract --backbone wav2vec2|hubert|wavlm`

The speech encoders themselves are registered encoders (abawfeat/encoders/speech.py). docs/audio.md explains
the alignment rule and the options.
"""
