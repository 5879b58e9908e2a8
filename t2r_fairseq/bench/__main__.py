from t2r_fairseq.bench.cli import main

main()
