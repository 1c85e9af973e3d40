"""The switchbank HTTP service (FastAPI). Imports the switchbank library, never the other way."""
