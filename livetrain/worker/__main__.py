from livetrain.worker.process import main

main()
