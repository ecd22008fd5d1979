-- weekly chunks of packed days: retention drops whole weeks, as it drops hot chunks
SELECT create_hypertable('{schema}.numeric_packed', by_range('bucket', INTERVAL '7 days'),
                         create_default_indexes => FALSE, if_not_exists => TRUE,
                         migrate_data => TRUE);
