from livetrain.worker.main import main

main()
