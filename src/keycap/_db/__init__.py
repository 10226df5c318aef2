"""Everything that talks to the database: engines, schema, types and statements."""
