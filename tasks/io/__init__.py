"""The outside world: files, S3, datasets and Hugging Face models.

Owns: atomic folder writes and locks (``fsutil``), S3 with retries and the model mirror
(``s3``), the loopback S3 server (``s3_server``), Airflow connections as credentials
(``connections``), the DialogSum-style data set (``dialogues``), and loading, sampling and
scoring models (``models``).

May import: ``tasks.config`` and ``tasks.errors`` only.
"""
