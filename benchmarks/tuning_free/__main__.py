from benchmarks.tuning_free.run import main

main()
