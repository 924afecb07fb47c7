"""The status store and the delivery-status model: the bottom layer, no Airflow operator code."""
