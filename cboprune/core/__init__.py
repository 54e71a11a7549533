"""The bottom layer: data types and errors, the options and their declarations (`Config`), the one
writer, the NaN guard, the method registry and device helpers. Imports nothing else of cboprune."""
