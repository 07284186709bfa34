"""The database: engines, sessions, migrations, the data model and portable SQL."""
