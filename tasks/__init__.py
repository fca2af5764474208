"""Pipeline logic of the detox retraining workflow: plain Python, no Airflow imports."""
