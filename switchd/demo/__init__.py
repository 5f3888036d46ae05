"""Demo catalog and a stand-in inference engine for machines without a GPU."""
