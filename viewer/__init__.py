"""The Streamlit viewer: `streamlit run viewer/app.py`. The helpers here are pure and importable."""
