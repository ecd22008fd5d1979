SELECT create_hypertable('{schema}.numeric_values', by_range('time', INTERVAL '{chunk_interval}'),
                         if_not_exists => TRUE, migrate_data => TRUE);
SELECT create_hypertable('{schema}.text_values', by_range('time', INTERVAL '{chunk_interval}'),
                         if_not_exists => TRUE, migrate_data => TRUE);
SELECT create_hypertable('{schema}.events', by_range('time', INTERVAL '7 days'),
                         if_not_exists => TRUE, migrate_data => TRUE);
