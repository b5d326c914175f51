-- Schema 3: the hourly prune finds delivered readings past retention
-- through this index instead of walking every delivered row.
CREATE INDEX readings_delivered ON readings (delivered_at) WHERE state = 'delivered';
